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
