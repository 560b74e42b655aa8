"""What ablating a unit does to the benchmark answers: the questions generated greedily in s1's two phases
(``lorascope.generation``: thinking, then the forced answer) with the unit ablated (``hooks.ablated_generation``),
graded as ``evaluate`` grades them, against the adapter as trained on the same questions: Δaccuracy with a
paired bootstrap 95% CI over questions, and Δbacktracking words per 1000 generated tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lorascope.bootstrap import interval, resamples, rng
from lorascope.chat import THINK
from lorascope.evaluate import benchmarks


def answer_rows(
    rows: Sequence[dict[str, Any]], outs: Sequence[Any], words: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per question: task, row, correct, generated tokens, backtracking words."""
    from lorascope.generation import count_words

    return [
        {
            "task": r["task"],
            "row": r["row"],
            "correct": int(benchmarks.score(r, THINK + g.text)["exact_match"]),
            "tokens": g.tokens,
            "backtracks": count_words(g.text, words),
        }
        for r, g in zip(rows, outs, strict=True)
    ]


def per_1k(answers: Sequence[dict[str, Any]]) -> float:
    return 1000 * sum(a["backtracks"] for a in answers) / max(sum(a["tokens"] for a in answers), 1)


def effect(
    lora: Sequence[dict[str, Any]], ablated: Sequence[dict[str, Any]], iters: int, seed: int, key: str
) -> dict[str, Any]:
    """Accuracy and backtracking with the unit ablated, their changes from ``lora`` (the same questions in
    the same order) and Δaccuracy's paired bootstrap 95% CI (None without resamples)."""
    a = np.array([r["correct"] for r in lora], dtype=float)
    b = np.array([r["correct"] for r in ablated], dtype=float)
    out: dict[str, Any] = {
        "accuracy": float(b.mean()),
        "delta_accuracy": float(b.mean() - a.mean()),
        "delta_accuracy_ci": None,
        "backtracks_per_1k": per_1k(ablated),
        "delta_backtracks_per_1k": per_1k(ablated) - per_1k(lora),
        "by_task": {
            t: float(np.mean([r["correct"] for r in ablated if r["task"] == t]))
            for t in dict.fromkeys(r["task"] for r in ablated)
        },
    }
    if iters:
        idx = resamples(len(a), iters, rng(seed, "attribute", key))
        out["delta_accuracy_ci"] = list(interval(b[idx].mean(axis=1) - a[idx].mean(axis=1)))
    return out
