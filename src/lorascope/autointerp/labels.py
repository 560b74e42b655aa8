"""The label table ``data/interp/<source>.parquet`` that ``autointerp`` writes and ``categorize``, ``steer``,
``attribute`` and ``report`` read, and the ``label:<regex>`` selector that picks a feature from it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from lorascope import paths
from lorascope.errors import LorascopeError

LABEL = "label:"
"""Prefix of a feature chosen from the labels by a regex over the explanations."""

LABEL_COLUMNS = (
    "source", "feature", "feature_name", "sign", "layer", "component", "explanation", "classification",
    "class_reasoning", "status", "error", "raw_response", "backend", "model", "prompt_hash", "input_tokens",
    "output_tokens", "cost_usd", "cached", "detection_balanced_accuracy", "detection_n",
)  # fmt: skip
"""Columns of ``data/interp/<source>.parquet`` (one row per feature; ``status`` ok | failed)."""


class NoLabelMatch(LorascopeError):
    """No ok label (of a live feature) matches a ``label:`` selector's regex."""

    def __init__(self, selector: str, files: Sequence[Path], key: str = "steer.directions") -> None:
        super().__init__(f"{key}: {selector!r} matches no ok label in {', '.join(map(str, files))}")
        self.finding = f"no ok label of {' or '.join(p.name for p in files)} matches it"
        """What the stage records (no absolute path: it goes into a DVC output)."""


def select_by_label(selector: str, root: Path, key: str = "steer.directions") -> str:
    """The feature a ``label:<regex>`` selector picks: among the ok labels of ``data/interp/sae.parquet``
    (live latents only) and ``lora.parquet`` whose explanation matches the regex (case-insensitive
    ``re.search``), the highest detection balanced accuracy, then the lowest class, SAE before LoRA, the
    lowest id. One-line errors (naming the params ``key``) for a bad regex, missing label sets or no match."""
    import pyarrow.parquet as pq

    pattern = selector[len(LABEL) :]
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise LorascopeError(f"{key}: {selector!r}: not a regular expression ({err})") from None
    interp = root / paths.INTERP
    files = [root / paths.labels(s) for s in ("sae", "lora") if (root / paths.labels(s)).is_file()]
    if not files:
        raise LorascopeError(
            f"{key}: {selector!r} needs labels ({interp}/lora.parquet or sae.parquet); "
            "run `lorascope autointerp` first"
        )
    alive: set[int] | None = None
    from lorascope.sae.load import ALIVE, alive_latents

    if (root / paths.labels("sae")).is_file() and (root / paths.SAE / ALIVE).is_file():
        alive = set(alive_latents(root / paths.SAE))
    cols = [
        "feature",
        "feature_name",
        "explanation",
        "status",
        "classification",
        "detection_balanced_accuracy",
    ]
    found = []
    for order, path in enumerate(files):  # sae first, then lora
        for r in pq.read_table(path, columns=cols).to_pylist():
            if r["status"] != "ok" or not r["explanation"] or not regex.search(r["explanation"]):
                continue
            if path.stem == "sae" and alive is not None and int(r["feature"]) not in alive:
                continue
            score = r["detection_balanced_accuracy"]
            cls = r["classification"]
            rank = (
                -(score if score is not None else -1.0),
                cls if cls is not None else 3,
                order,
                int(r["feature"]),
            )
            found.append((rank, r["feature_name"]))
    if not found:
        raise NoLabelMatch(selector, files, key)
    return min(found)[1]
