"""Read training rows in the s1K-1.1 schema from the hub, a local file or the synthetic generator."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorascope.errors import LorascopeError
from lorascope.prepare.params import PrepareSection

REQUIRED = ("question", "solution", "deepseek_thinking_trajectory", "deepseek_attempt")
"""Columns prepare needs from an s1K-1.1-schema source."""


@dataclass(frozen=True)
class Source:
    """Where the rows came from, for lineage."""

    kind: str
    """``hub``, ``local`` or ``synthetic``."""
    uri: str
    """Hub dataset id, absolute file path, or ``synthetic``."""
    details: dict[str, Any]
    """Revision/split (hub) or generator settings (synthetic)."""


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LorascopeError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    return rows


def _read_local(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise LorascopeError(f"{path}: dataset file not found (prepare.source)")
    if path.stat().st_size == 0:
        raise LorascopeError(f"{path}: file is empty, expected s1K-1.1 rows")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            try:
                return pd.read_parquet(path)
            except Exception as e:  # pyarrow raises several types for a corrupt file
                raise LorascopeError(
                    f"{path}: not a readable parquet file ({str(e).splitlines()[0]})"
                ) from None
        if suffix == ".jsonl":
            rows = _read_jsonl(path)
        else:
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise LorascopeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LorascopeError(
            f"{path}: cannot read dataset file ({getattr(e, 'strerror', None) or e})"
        ) from None
    if isinstance(rows, dict):  # column-oriented JSON: {"question": [...], ...}
        try:
            return pd.DataFrame(rows)
        except ValueError as e:
            raise LorascopeError(f"{path}: column-oriented JSON with unequal columns ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise LorascopeError(f"{path}: expected a list of row objects in the s1K-1.1 schema")
    return pd.DataFrame(rows)


def _read_hub(cfg: PrepareSection) -> Any:
    import datasets

    dataset_id = cfg.source.removeprefix("hub:")
    try:
        ds = datasets.load_dataset(dataset_id, split=cfg.split, revision=cfg.revision)
    except Exception as e:  # network, auth, unknown id: one line naming the dataset
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise LorascopeError(f"prepare.source: cannot load hub dataset {dataset_id!r} ({reason})") from None
    return ds.to_pandas()


def row_id(question: Any) -> str:
    """A stable id from the question text (s1K-1.1 has no id column): duplicates share an id."""
    return hashlib.sha1(str(question if question is not None else "").encode()).hexdigest()[:16]


def load_rows(cfg: PrepareSection) -> tuple[Any, Source]:
    """The training rows as a DataFrame with an ``id`` column, and where they came from."""
    import pandas as pd

    from lorascope import organism
    from lorascope.prepare import synthetic

    if cfg.source == "synthetic":
        generator = organism if cfg.synthetic.family == "organism" else synthetic
        df = pd.DataFrame(generator.train_rows(cfg.synthetic.n_train, cfg.synthetic.seed))
        source = Source("synthetic", "synthetic", cfg.synthetic.model_dump())
        where = "synthetic generator"
    elif cfg.source.startswith("hub:"):
        df = _read_hub(cfg)
        source = Source(
            "hub", cfg.source.removeprefix("hub:"), {"split": cfg.split, "revision": cfg.revision}
        )
        where = f"hub dataset {source.uri!r}"
    else:
        path = cfg.local_file
        assert path is not None  # neither synthetic nor hub: a local file
        df = _read_local(path)
        source = Source("local", str(path), {})
        where = str(path)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise LorascopeError(
            f"{where}: missing column(s) {', '.join(missing)} (expected the s1K-1.1 schema: {', '.join(REQUIRED)})"
        )
    if df.empty:
        raise LorascopeError(f"{where}: no rows, expected s1K-1.1 rows")
    if "id" in df.columns:
        df["id"] = df["id"].astype(str)
    else:
        df.insert(0, "id", [row_id(q) for q in df["question"]])
    return df.reset_index(drop=True), source
