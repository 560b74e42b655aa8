"""avg@k, unbiased pass@k and the seeded bootstrap CIs of the evaluate stage (lorascope.evaluate.uncertainty)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from lorascope.bootstrap import interval, rng
from lorascope.evaluate.uncertainty import ks, paired, pass_at_k, recovery_ci, task_summary


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n decodes (c of them correct) holding a correct one, by enumeration."""
    decodes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(decodes[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k)), (n, c, k)
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)  # pass@1 is the mean
    with pytest.raises(ValueError, match=r"pass@9 needs 0 < k <= n"):
        pass_at_k(8, 2, 9)


def test_reported_ks():
    assert ks(1) == [1] and ks(2) == [1, 2] and ks(8) == [1, 2, 4, 8] and ks(6) == [1, 2, 4, 6]


def test_task_summary_scores_and_their_cis():
    gen = random.Random(3)
    m = [[int(gen.random() < p) for _ in range(4)] for p in [0.1] * 10 + [0.5] * 10 + [0.9] * 10]
    s = task_summary(m, 500, 7, "math500")
    assert s["n"] == 30 and s["decodes"] == 4
    assert s["score"] == pytest.approx(np.mean(m))  # avg@4
    assert s["pass@4"] == pytest.approx(np.mean([any(r) for r in m]))  # n = k: any decode right
    assert s["pass@2"] == pytest.approx(np.mean([brute_pass_at_k(4, sum(r), 2) for r in m]))
    for key in ("score", "pass@1", "pass@2", "pass@4"):
        assert 0 <= s[f"{key}_ci_low"] <= s[key] <= s[f"{key}_ci_high"] <= 1, key
    assert s["pass@1"] == s["score"]
    assert task_summary(m, 500, 7, "math500") == s  # seeded: the same bytes every run
    assert task_summary(m, 500, 8, "math500") != s
    assert "score_ci_low" not in task_summary(m, 0, 7, "math500")  # no bootstrap, no CI


def test_greedy_summary_and_ci_width():
    m = [[int(i % 2 == 0)] for i in range(400)]  # one decode, half right
    s = task_summary(m, 2000, 0, "aime")
    assert s["decodes"] == 1 and s["score"] == 0.5 and not any(k.startswith("pass@") for k in s)
    normal = 2 * 1.96 * (0.25 / 400) ** 0.5  # the binomial CI width the bootstrap should approach
    assert s["score_ci_high"] - s["score_ci_low"] == pytest.approx(normal, rel=0.15)
    assert task_summary([[1]] * 5, 100, 0, "x")["score_ci_low"] == 1.0  # no spread, no width
    assert task_summary([], 100, 0, "x") == {"score": None, "n": 0, "decodes": 0}


def test_interval_is_the_central_95_percent():
    lo, hi = interval(np.arange(1001, dtype=float))
    assert (lo, hi) == (25.0, 975.0)


def test_paired_recovery_ci():
    base = np.array([1.0] * 20 + [0.0] * 40)
    lora = np.array([1.0] * 40 + [0.0] * 20)
    # an ablated adapter right on exactly the LoRA's questions recovers all of its gain in every
    # resample; an unpaired bootstrap (separate resamples per variant) would spread around 1
    lo, hi, dropped = recovery_ci(base, lora.copy(), lora, 300, rng(0, "t"))
    assert (lo, hi, dropped) == (1.0, 1.0, 0.0)
    lo, hi, _ = recovery_ci(base, base.copy(), lora, 300, rng(0, "t"))
    assert (lo, hi) == (0.0, 0.0)
    half = np.array([1.0] * 30 + [0.0] * 30)
    lo, hi, _ = recovery_ci(base, half, lora, 300, rng(0, "t"))
    assert lo < 0.5 < hi
    # a reference that gains on one question of sixty: most resamples have no gain to recover
    thin = base.copy()
    thin[20] = 1.0
    lo, hi, dropped = recovery_ci(base, thin, thin, 300, rng(0, "t"))
    assert 0.2 < dropped < 0.5 and lo == hi == 1.0
    assert recovery_ci(base, base, base, 50, rng(0, "t")) is None  # never any gain


def test_pairing_uses_the_questions_all_variants_answered():
    per_q = {
        "base": {"a": 0.0, "b": 1.0, "c": 0.0},
        "lora": {"c": 1.0, "a": 1.0},
        "full": {"a": 1.0, "c": 0.5},
    }
    scores, why = paired(per_q, ["base", "lora", "full"])
    assert why is None and scores.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 0.5]]  # a, c in id order
    assert paired(per_q, ["base", "nope"])[1] == "no per-question results for nope"
    assert (
        paired({"base": {"a": 1.0}, "lora": {"b": 1.0}}, ["base", "lora"])[1]
        == "base, lora share no question"
    )
