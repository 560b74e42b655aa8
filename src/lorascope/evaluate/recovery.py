"""Table 1 (and Table 2's columns): how much of the full finetune's gain a variant recovers.

recovery = (variant - base) / (full - base) per task. When the full finetune did not beat the base
(full <= base) there is no gain to recover, and the value is null with the reason beside it.
"""

from __future__ import annotations

from typing import Any

REFERENCES = ("base", "full")


def recovery(
    base: float | None, variant: float | None, full: float | None
) -> tuple[float | None, str | None]:
    """``(value, reason)``: the recovered fraction, or None and why not."""
    if base is None or variant is None or full is None:
        missing = [n for n, v in (("base", base), ("variant", variant), ("full", full)) if v is None]
        return None, f"no score for {', '.join(missing)}"
    if full <= base:
        return None, f"full ({full:.4g}) <= base ({base:.4g}): the full finetune gained nothing to recover"
    return (variant - base) / (full - base), None


def table(scores: dict[str, dict[str, float]], tasks: list[str]) -> dict[str, Any]:
    """Per task: every variant's score, and for each variant other than base and full its recovery
    (``recovery`` for ``lora``, ``recovery.<variant>`` for the others) with ``reason`` where null."""
    out: dict[str, Any] = {}
    for task in tasks:
        row: dict[str, Any] = {v: s.get(task) for v, s in scores.items()}
        base, full = row.get("base"), row.get("full")
        for variant in scores:
            if variant in REFERENCES:
                continue
            key = "recovery" if variant == "lora" else f"recovery.{variant}"
            value, reason = recovery(base, row[variant], full)
            row[key] = value
            if reason:
                row[f"{key}.reason"] = reason
        out[task] = row
    return out


def markdown(rows: dict[str, Any], variants: list[str]) -> str:
    """The table as markdown: one row per task, scores then recoveries."""
    first = [v for v in ("base", "lora", "full") if v in variants]
    rec = [k for k in next(iter(rows.values()), {}) if k.startswith("recovery") and not k.endswith(".reason")]
    head = ["task", *first, *(v for v in variants if v not in first), *rec]

    def cell(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [
        "| " + " | ".join([task] + [cell(r.get(k)) for k in head[1:]]) + " |" for task, r in rows.items()
    ]
    return "\n".join(lines) + "\n"
