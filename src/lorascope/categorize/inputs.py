"""The stage's inputs: each source's labelled features, with the examples and maximum its B.2b prompt shows.

A source's label set is ``data/interp/<source>.parquet`` (the ``autointerp`` stage's schema; only rows with
``status == "ok"`` are categorized) and its contexts ``data/contexts/<source>.parquet`` (the ``contexts``
stage's table). Features are matched by ``feature_name``, which is unique within a source (``L3.q_proj+`` and
``L3.q_proj-`` are the two signs of one LoRA direction). ``lora`` and ``mlp`` are required, ``sae`` is used
when its label set exists.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorascope import paths
from lorascope.errors import LorascopeError
from lorascope.labelling.prompts import Example
from lorascope.project import workspace_root

SOURCES = ("lora", "mlp", "sae")
"""Every source the stage knows, in output order."""
REQUIRED = ("lora", "mlp")
"""Sources without which there are no shared categories (the paper's LoRA-vs-MLP comparison)."""
_LABEL_COLUMNS = ("feature", "feature_name", "sign", "explanation", "status")
_CONTEXT_COLUMNS = ("feature_name", "sign", "kind", "rank", "activation", "window_acts", "tokens")


def label_path(source: str) -> Path:
    """``data/interp/<source>.parquet``."""
    return workspace_root() / paths.labels(source)


def contexts_path(source: str) -> Path:
    """``data/contexts/<source>.parquet``."""
    return workspace_root() / paths.contexts(source)


@dataclass(frozen=True)
class Feature:
    """One labelled feature as the assignment prompt sees it."""

    source: str
    feature: int
    """The contexts stage's feature id (a LoRA direction's column, shared by its two signs)."""
    feature_name: str
    sign: int
    """+1 or -1 (LoRA directions); +1 for MLP neurons and SAE latents."""
    explanation: str
    examples: tuple[Example, ...]
    """The first top-activating windows, activations sign-adjusted (positive = fires)."""
    max_act: float
    """The feature's largest sign-adjusted activation over the store (its rank-0 top context)."""


def present_sources() -> list[str]:
    """The sources to categorize: ``lora`` and ``mlp`` (a missing label set is an error), ``sae`` if present."""
    for source in REQUIRED:
        path = label_path(source)
        if not path.is_file():
            raise LorascopeError(
                f"{path}: label set not found; run `lorascope autointerp --source {source}` first"
            )
    return [s for s in SOURCES if s in REQUIRED or label_path(s).is_file()]


def _read(path: Path, columns: tuple[str, ...], **kwargs: Any) -> list[dict[str, Any]]:
    """Rows of a parquet file as dicts, with a one-line error for an unreadable file or missing columns."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise LorascopeError(f"{path}: missing column(s) {', '.join(missing)}")
        return pq.read_table(path, columns=list(columns), **kwargs).to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise LorascopeError(f"{path}: unreadable parquet ({' '.join(str(err).split())})") from None


def ok_labels(source: str) -> list[dict[str, Any]]:
    """The ``status == "ok"`` rows of ``source``'s label set, in file order."""
    path = label_path(source)
    if not path.is_file():
        raise LorascopeError(
            f"{path}: label set not found; run `lorascope autointerp --source {source}` first"
        )
    rows = [r for r in _read(path, _LABEL_COLUMNS) if r["status"] == "ok"]
    names = [r["feature_name"] for r in rows]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LorascopeError(f"{path}: feature {dup} is labelled more than once")
    for r in rows:
        if not (isinstance(r["explanation"], str) and r["explanation"].strip()):
            raise LorascopeError(f"{path}: feature {r['feature_name']} has status ok but no explanation")
    return rows


def load_features(source: str, n_examples: int, only: Collection[int] | None = None) -> list[Feature]:
    """The ok features of ``source`` with their first ``n_examples`` top contexts (label-set order);
    ``only``: keep just the features with these ids (the live SAE latents), drop the others."""
    labels = ok_labels(source)
    if only is not None:
        keep = set(only)
        labels = [r for r in labels if int(r["feature"]) in keep]
    path = contexts_path(source)
    if not path.is_file():
        raise LorascopeError(f"{path}: contexts not found; run `lorascope contexts --source {source}` first")
    top: dict[str, list[dict[str, Any]]] = {}
    for row in _read(path, _CONTEXT_COLUMNS, filters=[("kind", "=", "top")]):
        top.setdefault(row["feature_name"], []).append(row)
    features = []
    for label in labels:
        name = label["feature_name"]
        rows = sorted(top.get(name, []), key=lambda r: r["rank"])
        if not rows:
            raise LorascopeError(
                f"{label_path(source)}: feature {name} has no top contexts in {path}; the label set is older "
                f"than the contexts, re-run `lorascope autointerp --source {source}`"
            )
        sign = int(label["sign"])
        examples = tuple(
            Example(list(r["tokens"]), [sign * float(a) for a in r["window_acts"]]) for r in rows[:n_examples]
        )
        max_act = max(sign * float(r["activation"]) for r in rows)
        max_act = max_act if max_act > 0 else 1.0  # nothing fired: no token is shown at any scale
        features.append(
            Feature(
                source, int(label["feature"]), name, sign, label["explanation"].strip(), examples, max_act
            )
        )
    return features
