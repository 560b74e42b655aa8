"""The dashboard's bulk arrays: ``Bulk`` in logical form, and how it is quantised and packed
(int8 activations per feature scale, LEB128 token ids into a per-dashboard vocabulary) for ``render``.
The layout is described in ``lorascope.report.dashboard``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


@dataclass
class Bulk:
    """The bulky arrays of a dashboard in logical form; ``render`` quantises and packs them.

    Contexts are grouped by feature, in the order of ``meta["features"]``: feature ``i`` owns contexts
    ``ctx[0] .. ctx[0] + ctx[1]`` (its ``"ctx": [first, count]``). Training samples: the token ids of
    each sample segment (a span of one document, shared by every feature whose sample lies in it), and
    each sampled feature's activations over its own span, concatenated in feature order.
    """

    vocab: list[str]
    """Token strings; every id below indexes it."""
    ctx_tokens: np.ndarray
    """int [N]: vocabulary ids of every context window, concatenated."""
    ctx_acts: np.ndarray
    """float [N]: the feature's activation at each of those tokens."""
    ctx_lengths: np.ndarray
    """int [C]: tokens per context window."""
    ctx_peak: np.ndarray
    """int [C]: index of the selected (max-activating) token within its window."""
    ctx_activation: np.ndarray
    """float [C]: the exact activation of the selected token."""
    ctx_doc: np.ndarray
    """int [C]: document index (in the store) of each context."""
    ctx_position: np.ndarray
    """int [C]: position of the selected token in its document."""
    seg_tokens: np.ndarray
    """int [M]: vocabulary ids of the sample segments, concatenated."""
    seg_lengths: np.ndarray
    """int [S]: tokens per sample segment."""
    sample_acts: np.ndarray
    """float [K]: activations of each sampled feature over its span (``sample.len`` each)."""
    heat: np.ndarray
    """float [H, layers x kinds]: SAE decoder rows on the ``meta["heatmap"]`` grid (NaN: no component)."""


def uint(values: np.ndarray) -> np.ndarray:
    """``values`` as the narrowest of uint8/16/32 that holds them."""
    import numpy as np

    top = int(values.max()) if values.size else 0
    for t in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(t).max:
            return values.astype(t)
    raise ValueError(f"value {top} does not fit in uint32")


def leb128(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 of ``values`` (7 bits per byte, high bit set on all but the last byte of each)."""
    import numpy as np

    v = values.astype(np.uint64)
    n = np.ones(len(v), np.int64)
    for k in range(1, 5):
        n += v >= (1 << (7 * k))
    out = np.zeros(int(n.sum()), np.uint8)
    pos = np.cumsum(n) - n
    for k in range(5):
        m = n > k
        out[pos[m] + k] = ((v[m] >> np.uint64(7 * k)) & np.uint64(127)).astype(np.uint8) | np.where(
            n[m] > k + 1, 128, 0
        ).astype(np.uint8)
    return out


def columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows as columns (the keys once, not once per feature); a dict-valued key ``k`` becomes a 0/1
    column ``k`` and one column ``k.sub`` per sub-key. ``rows_of`` is the inverse."""
    keys: dict[str, dict[str, None] | None] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, dict):
                subs = keys.get(k) or {}
                subs.update(dict.fromkeys(v))
                keys[k] = subs
            else:
                keys.setdefault(k, None)
    cols: dict[str, list[Any]] = {}
    for k, sub_keys in keys.items():
        if sub_keys is None:
            cols[k] = [r.get(k) for r in rows]
        else:
            cols[k] = [int(isinstance(r.get(k), dict)) for r in rows]
            for sub in sub_keys:
                cols[f"{k}.{sub}"] = [(r.get(k) or {}).get(sub) for r in rows]
    return {"n": len(rows), "columns": cols}


def rows_of(table: dict[str, Any]) -> list[dict[str, Any]]:
    """The feature dicts of a ``columns`` table (as the page rebuilds them)."""
    cols = table["columns"]
    rows: list[dict[str, Any]] = [{} for _ in range(table["n"])]
    for name, values in cols.items():
        if "." in name:
            continue
        nested = any(c.startswith(name + ".") for c in cols)
        for r, v in zip(rows, values, strict=True):
            r[name] = ({} if v else None) if nested else v
    for name, values in cols.items():
        if "." in name:
            k, sub = name.split(".", 1)
            for r, v in zip(rows, values, strict=True):
                if r[k] is not None:
                    r[k][sub] = v
    return rows


def quantise(values: np.ndarray, owner: np.ndarray, n_owners: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes ``round(127 * v / scale[owner])`` and the per-owner scale (its largest |v|)."""
    import numpy as np

    values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    scale = np.zeros(n_owners, np.float32)
    if values.size:
        np.maximum.at(scale, owner, np.abs(values))
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.rint(values / safe[owner] * 127).clip(-127, 127).astype(np.int8)
    return q, scale
