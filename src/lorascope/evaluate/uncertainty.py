"""Uncertainty of benchmark scores: avg@k, unbiased pass@k and seeded bootstrap 95% CIs.

A task's results are a 0/1 matrix, one row per question and one column per decode (one greedy
decode, or ``evaluate.samples`` sampled ones). Every reported figure is a mean over questions of a
per-question value, so its CI is a percentile bootstrap over questions; a recovery compares three
variants on the same questions, so its bootstrap resamples the questions jointly (paired). The
resampling generator is seeded from ``evaluate.seed`` and what is being resampled, so outputs are
the same bytes in every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb
from typing import Any

import numpy as np

from lorascope.bootstrap import interval, resamples, rng


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one question with ``c`` correct among ``n >= k`` decodes (Chen et al.,
    2021): the chance that ``k`` of them drawn without replacement include a correct one."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@{k} needs 0 < k <= n and 0 <= c <= n (n={n}, c={c})")
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks(n: int) -> list[int]:
    """The k of the reported pass@k for ``n`` decodes: powers of two up to ``n``, and ``n``."""
    out = [k for k in (2**i for i in range(n.bit_length())) if k <= n]
    return sorted({*out, n})


def task_summary(correct: Sequence[Sequence[int]], iters: int, seed: int, key: str) -> dict[str, Any]:
    """Score (mean correctness: greedy accuracy, or avg@k over ``k`` sampled decodes), pass@k for
    the ``ks`` of ``k > 1`` decodes, and each one's bootstrap 95% CI (``_ci_low`` / ``_ci_high``;
    none when ``iters`` is 0 or there are no questions)."""
    m = np.asarray(correct, dtype=float)
    if m.size == 0:
        return {"score": None, "n": 0, "decodes": 0}
    n_q, k = m.shape
    per_q: dict[str, np.ndarray] = {"score": m.mean(axis=1)}
    if k > 1:
        c = m.sum(axis=1).astype(int)
        for j in ks(k):
            per_q[f"pass@{j}"] = np.array([pass_at_k(k, int(ci), j) for ci in c])
    out: dict[str, Any] = {"n": n_q, "decodes": k}
    idx = resamples(n_q, iters, rng(seed, key)) if iters else None
    for name, values in per_q.items():
        out[name] = float(values.mean())
        if idx is not None:
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = interval(values[idx].mean(axis=1))
    return out


def paired(
    per_question: dict[str, dict[str, float]], variants: Sequence[str]
) -> tuple[np.ndarray, str | None]:
    """The per-question scores of ``variants`` on the questions all of them answered, as a
    ``[variants, questions]`` array (question order: sorted ids), or why there is none."""
    missing = [v for v in variants if v not in per_question]
    if missing:
        return np.empty((0, 0)), f"no per-question results for {', '.join(missing)}"
    common = sorted(set.intersection(*(set(per_question[v]) for v in variants)))
    if not common:
        return np.empty((0, 0)), f"{', '.join(variants)} share no question"
    return np.array([[per_question[v][q] for q in common] for v in variants]), None


def recovery_ci(
    base: np.ndarray, variant: np.ndarray, reference: np.ndarray, iters: int, gen: np.random.Generator
) -> tuple[float, float, float] | None:
    """Paired bootstrap 95% CI of ``(variant - base) / (reference - base)`` over questions (arrays
    of per-question scores in the same question order), and the share of resamples where the
    reference gained nothing (left out: they have no recovery); None when no resample has one."""
    idx = resamples(len(base), iters, gen)
    b, v, r = base[idx].mean(axis=1), variant[idx].mean(axis=1), reference[idx].mean(axis=1)
    gain = r - b
    ok = gain > 0
    if not ok.any():
        return None
    lo, hi = interval((v[ok] - b[ok]) / gain[ok])
    return lo, hi, float(1 - ok.mean())
