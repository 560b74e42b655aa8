"""Tables 1 and 2 from the recovery table (``metrics/recovery.json``), as markdown and CSV.

Table 1: per task the base, LoRA and full scores and the LoRA's recovery of the full finetune's gain.
Table 2: the ablated adapters (every other evaluated variant) beside the LoRA, with their recoveries.
A null recovery shows as an em dash in markdown and an empty CSV cell, its reason in a footnote.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

REFERENCES = ("base", "lora", "full")


@dataclass
class Table:
    """A rendered table: its header, rows of cells (None for null) and footnotes."""

    header: list[str]
    rows: list[list[Any]]
    notes: list[str]

    def markdown(self) -> str:
        def cell(v: Any) -> str:
            return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes] if self.notes else []
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.header)
        writer.writerows([["" if v is None else v for v in row] for row in self.rows])
        return buf.getvalue()


def _table(recovery: dict[str, Any], scores: list[str], recoveries: list[str]) -> Table:
    rows, notes = [], []
    for task, row in recovery["tasks"].items():
        rows.append([task, *(row.get(v) for v in scores), *(row.get(r) for r in recoveries)])
        notes += [f"{task}, {r}: {row[f'{r}.reason']}" for r in recoveries if row.get(f"{r}.reason")]
    return Table(["task", *scores, *recoveries], rows, notes)


def variants(recovery: dict[str, Any]) -> list[str]:
    """Every variant with a score in the table, in first-seen order."""
    seen: dict[str, None] = {}
    for row in recovery["tasks"].values():
        seen.update({k: None for k in row if not k.startswith("recovery")})
    return list(seen)


def table1(recovery: dict[str, Any]) -> Table:
    """base / lora / full / recovery per task."""
    present = [v for v in REFERENCES if v in variants(recovery)]
    return _table(recovery, present, ["recovery"] if "lora" in present else [])


def table2(recovery: dict[str, Any]) -> Table | None:
    """The LoRA and every other variant (the ablated adapters) with their recoveries; None when the
    table has no such variant."""
    others = [v for v in variants(recovery) if v not in REFERENCES]
    if not others:
        return None
    scores = [v for v in ("lora",) if v in variants(recovery)] + others
    return _table(
        recovery, scores, [r for r in ("recovery",) if "lora" in scores] + [f"recovery.{v}" for v in others]
    )
