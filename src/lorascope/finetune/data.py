"""Training rows from ``data/prepared/train.parquet`` and the padding collator with loss masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorascope.errors import LorascopeError

IGNORE = -100
"""Label value cross-entropy ignores (prompt and padding positions)."""


class PreparedRows:
    """A map-style dataset over the prepared rows: token ids and where the trained span starts."""

    def __init__(self, prepared_dir: str | Path) -> None:
        from lorascope.prepare import table as prepared_table

        path = prepared_table.path(Path(prepared_dir))
        table = prepared_table.read(Path(prepared_dir), ["input_ids", "loss_start"])
        self.input_ids: list[list[int]] = table.column("input_ids").to_pylist()
        self.loss_start: list[int] = table.column("loss_start").to_pylist()
        if not self.input_ids:
            raise LorascopeError(f"{path}: no rows")

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "loss_start": self.loss_start[i]}


class Collator:
    """Right-pads a batch; labels are the ids from ``loss_start`` on and -100 elsewhere."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            ids = torch.as_tensor(r["input_ids"], dtype=torch.long)
            input_ids[i, : len(ids)] = ids
            attention_mask[i, : len(ids)] = 1
            labels[i, r["loss_start"] : len(ids)] = ids[r["loss_start"] :]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
