"""Tables 1 and 2: how much of a reference's gain over the base a variant recovers.

recovery = (variant - base) / (reference - base) per task. The reference is named per variant
(``evaluate.variants.<name>.reference``); by default the LoRA's is the full finetune (Table 1) and
an ablated adapter's (``lora-*-ablated``) is the LoRA itself, as the paper's Appendix C reports
Table 2: an ablated adapter's score as a share of the LoRA's own gain. When the reference did not
beat the base there is no gain to recover, and the value is null with the reason beside it; so is a
variant without a score. With per-question results, each recovery gets a paired bootstrap 95% CI
(the same resampled questions for the variant, its reference and the base).
"""

from __future__ import annotations

import re
from typing import Any

from lorascope.bootstrap import rng
from lorascope.evaluate import uncertainty

NO_COLUMN = ("base", "full")
"""Variants without a recovery column: the base and the full finetune (Table 1's reference)."""
_ABLATED = re.compile(r"lora-.+-ablated")
_GAINER = {"full": "the full finetune", "lora": "the LoRA"}


def default_reference(variant: str) -> str:
    """``lora`` for an ablated adapter (``lora-*-ablated``: Table 2), else ``full`` (Table 1)."""
    return "lora" if _ABLATED.fullmatch(variant) else "full"


def column(variant: str) -> str:
    """The recovery column of ``variant``: ``recovery`` for the LoRA, ``recovery.<variant>`` else."""
    return "recovery" if variant == "lora" else f"recovery.{variant}"


def recovery(
    base: float | None,
    variant: float | None,
    reference: float | None,
    names: tuple[str, str] = ("variant", "full"),
) -> tuple[float | None, str | None]:
    """``(value, reason)``: the recovered share of the reference's gain, or None and why not
    (``names``: the variant's and the reference's, for the reason)."""
    name, ref = names
    if base is None or variant is None or reference is None:
        missing = [n for n, v in (("base", base), (name, variant), (ref, reference)) if v is None]
        return None, f"no score for {', '.join(missing)}"
    if reference <= base:
        gainer = _GAINER.get(ref, ref)
        return None, f"{ref} ({reference:.4g}) <= base ({base:.4g}): {gainer} gained nothing to recover"
    return (variant - base) / (reference - base), None


def table(
    scores: dict[str, dict[str, float]],
    tasks: list[str],
    variants: list[str] | None = None,
    references: dict[str, str | None] | None = None,
    per_question: dict[str, dict[str, dict[str, float]]] | None = None,
    iters: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Per task: every variant's score, and for each variant other than base and full its recovery
    (``column(variant)``) with ``.reason`` where null and, given ``per_question`` results
    (``{variant: {task: {question id: score}}}``) and ``iters``, its paired bootstrap CI
    (``.ci_low`` / ``.ci_high``; ``.ci_dropped``: the share of resamples where the reference gained
    nothing; ``.ci_reason`` where there is none). ``variants`` (default: those with scores) are the
    configured ones, so one without a score still gets its column, null with the reason."""
    variants = list(variants if variants is not None else scores)
    refs = reference_map(variants, references)
    out: dict[str, Any] = {}
    for task in tasks:
        row: dict[str, Any] = {v: scores.get(v, {}).get(task) for v in variants}
        for variant, ref in refs.items():
            key = column(variant)
            value, reason = recovery(row.get("base"), row[variant], row.get(ref), (variant, ref))
            row[key] = value
            if reason:
                row[f"{key}.reason"] = reason
            elif per_question is not None and iters:
                row.update(_ci(key, task, variant, ref, per_question, iters, seed))
        out[task] = row
    return out


def reference_map(variants: list[str], references: dict[str, str | None] | None = None) -> dict[str, str]:
    """``{variant: reference}`` for every variant with a recovery column."""
    references = references or {}
    return {v: references.get(v) or default_reference(v) for v in variants if v not in NO_COLUMN}


def formulas(variants: list[str], references: dict[str, str | None] | None = None) -> dict[str, str]:
    """``{column: formula}``: what each recovery column divides by."""
    return {
        column(v): f"({v} - base) / ({ref} - base)" for v, ref in reference_map(variants, references).items()
    }


def _ci(
    key: str, task: str, variant: str, ref: str, per_question: dict[str, dict[str, dict[str, float]]],
    iters: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    names = ["base", variant, ref]
    per_task = {v: per_question[v][task] for v in names if task in per_question.get(v, {})}
    scores, why = uncertainty.paired(per_task, names)
    if why:
        return {f"{key}.ci_reason": why}
    base, var, reference = scores  # rows in the order of ``names``
    gen = rng(seed, "recovery", task, variant, ref)
    got = uncertainty.recovery_ci(base, var, reference, iters, gen)
    if got is None:
        return {f"{key}.ci_reason": f"{ref} gained nothing over base in every bootstrap resample"}
    lo, hi, dropped = got
    out = {f"{key}.ci_low": lo, f"{key}.ci_high": hi}
    if dropped:
        out[f"{key}.ci_dropped"] = dropped
    return out


def markdown(rows: dict[str, Any], variants: list[str], formulas: dict[str, str] | None = None) -> str:
    """The table as markdown: one row per task, scores then recoveries (with their 95% CI), then
    what each recovery divides by and why a value is missing."""
    first = [v for v in ("base", "lora", "full") if v in variants]
    keys: dict[str, Any] = next(iter(rows.values()), {})
    rec = [
        k
        for k in keys
        if k == "recovery" or (k.startswith("recovery.") and k.removeprefix("recovery.") in variants)
    ]
    head = ["task", *first, *(v for v in variants if v not in first), *rec]

    def cell(row: dict[str, Any], k: str) -> str:
        v = row.get(k)
        if v is None:
            return "—"
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        if f"{k}.ci_low" in row:
            text += f" [{row[f'{k}.ci_low']:.3f}, {row[f'{k}.ci_high']:.3f}]"
        return text

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([task] + [cell(r, k) for k in head[1:]]) + " |" for task, r in rows.items()]
    notes = [f"{k} = {f}" for k, f in (formulas or {}).items() if k in rec]
    notes += [
        f"{task}, {k}: {r[f'{k}.reason']}" for task, r in rows.items() for k in rec if f"{k}.reason" in r
    ]
    if any(f"{k}.ci_low" in r for r in rows.values() for k in rec):
        notes.append("[low, high]: paired bootstrap 95% CI over questions")
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"
