"""The prepared training table, ``data/prepared/train.parquet``: one row per training chat (its id, the
chat text, ``input_ids``, ``loss_start``: the first trained token, and token counts). ``prepare`` writes
it; every stage that reads it goes through ``read``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorascope.errors import LorascopeError

FILE = "train.parquet"


def path(prepared: Path) -> Path:
    """The table inside a prepared-data directory."""
    return Path(prepared) / FILE


def read(prepared: Path, columns: list[str] | None = None) -> Any:
    """The table (a pyarrow Table, only ``columns`` when given); a one-line error when it is missing."""
    import pyarrow.parquet as pq

    p = path(prepared)
    if not p.is_file():
        raise LorascopeError(f"{p}: prepared data not found; run `lorascope prepare` (or `dvc repro`) first")
    return pq.read_table(p, columns=columns)


def write(prepared: Path, table: Any) -> None:
    """Write ``table`` (a pyarrow Table) as the directory's prepared table."""
    import pyarrow.parquet as pq

    pq.write_table(table, path(prepared))


def sample(prepared: Path, n: int, max_tokens: int, seed: int, key: str) -> list[tuple[str, list[int], int]]:
    """``(row id, token ids cut to max_tokens, first response token)`` of ``n`` rows drawn with ``seed``
    among those with a response token inside the cut, in table order (how ``ablate`` and ``attribute``
    pick their sequences); none eligible is a one-line error naming ``key`` (the max_tokens param)."""
    import random

    table = read(prepared, ["id", "input_ids", "loss_start"]).to_pylist()
    eligible = [i for i, r in enumerate(table) if 0 < r["loss_start"] < min(len(r["input_ids"]), max_tokens)]
    if not eligible:
        raise LorascopeError(f"{path(prepared)}: no row has a response token within {key} ({max_tokens})")
    chosen = sorted(random.Random(seed).sample(eligible, min(n, len(eligible))))
    return [(table[i]["id"], table[i]["input_ids"][:max_tokens], table[i]["loss_start"]) for i in chosen]
