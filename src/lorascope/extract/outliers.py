"""The outlier record of an activation store (``outliers.json`` beside ``index.json``).

In real Qwen models the first position and some template tokens carry activations hundreds of times
the median (attention sinks); left in, they dominate top-k contexts and SAE training. The record says
how far each component's largest |activation| is from its median, how many tokens exceed
``extract.outlier_ratio`` x the median (per component, and per token id: which tokens they are), and
the median L2 norm of a token's activation vector (the unit of the ``exclude.norm_ratio`` cut).

Medians come from histograms of the float32 bit patterns of |x|: the top 13 bits (exponent and 5
mantissa bits) make 8192 bins, each at most 1/32 of its value wide, so a median is known to within
1.6% whatever the scale, in one streaming pass and C x 8192 counters. A second pass counts the tokens
over the limit. The file holds nothing run-specific: equal stores give equal bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorascope import kernels
from lorascope.extract.store import Store

FILE = "outliers.json"
_SHIFT = 18
_BINS = 1 << (31 - _SHIFT)
_CHUNK_VALUES = 1 << 24
"""Values binned at once (tokens x components): bounds the index tensor at 128 MB."""
TOP_TOKENS = 50
"""Token ids listed (those with the most tokens over the limit)."""


def _bin(abs_values: torch.Tensor) -> torch.Tensor:
    """The histogram bin of each non-negative float32 value (non-finite values go to the top bins)."""
    return (abs_values.contiguous().view(torch.int32) >> _SHIFT).long()


def _bin_value(b: torch.Tensor) -> torch.Tensor:
    """The geometric centre of bins ``b`` (0 for the bin of 0)."""
    lo = (b.int() << _SHIFT).view(torch.float32).double()
    hi = ((b.int() + 1) << _SHIFT).view(torch.float32).double()
    return kernels.sqrt(lo * hi)


def _median(hist_CB: torch.Tensor) -> torch.Tensor:
    """Per row, the value of the bin holding the median."""
    cum = hist_CB.cumsum(1)
    b = (2 * cum < cum[:, -1:]).sum(1)
    return _bin_value(b)


def record(
    store: Store, ratio: float, token_text: Callable[[list[int]], list[str]], device: Any = "cpu"
) -> dict[str, Any]:
    """The outlier record of ``store`` (see the module docstring); ``token_text`` names token ids."""
    from lorascope.devices import stream_to

    C, dev = len(store.components), torch.device(device)
    special = set(store.index.get("special_token_ids") or [])
    hist = torch.zeros(C * _BINS, dtype=torch.long, device=dev)
    norm_hist = torch.zeros(_BINS, dtype=torch.long, device=dev)
    max_C = torch.zeros(C, device=dev)
    offsets_C = torch.arange(C, device=dev) * _BINS
    for _, acts_TC, _ in stream_to(store, dev):
        for x in acts_TC.split(max(1, _CHUNK_VALUES // C)):
            x = x.float().abs()
            hist += torch.bincount((_bin(x) + offsets_C).flatten(), minlength=C * _BINS)
            norm_hist += torch.bincount(_bin(x.norm(dim=1)), minlength=_BINS)
            max_C = torch.maximum(max_C, torch.where(torch.isfinite(x), x, 0).amax(0))
    median_C = _median(hist.view(C, _BINS)).cpu()
    norm_median = float(_median(norm_hist[None])[0])
    limit_C = (ratio * median_C).float().to(dev)
    over_C = torch.zeros(C, dtype=torch.long, device=dev)
    ids_over: dict[int, int] = {}
    ids_all: dict[int, int] = {}
    first_over = 0
    for shard, acts_TC, ids_T in stream_to(store, dev):
        over_TC = acts_TC.float().abs() > limit_C
        over_C += over_TC.sum(0)
        any_T = over_TC.any(1)
        first_over += int(any_T[store.document_starts(shard).to(dev)].sum())
        for counts, ids in ((ids_all, ids_T), (ids_over, ids_T[any_T])):
            values, n = torch.unique(ids.long(), return_counts=True)
            for i, c in zip(values.tolist(), n.tolist(), strict=True):
                counts[i] = counts.get(i, 0) + c
    top = sorted(ids_over, key=lambda i: (-ids_over[i], i))[:TOP_TOKENS]
    names = token_text(top) if top else []
    max_C = max_C.cpu().double()
    return {
        "outlier_ratio": ratio,
        "tokens": store.tokens,
        "token_norm_median": _round(norm_median),
        "tokens_over": sum(ids_over.values()),
        "tokens_over_first_position": first_over,
        "tokens_over_special": sum(c for i, c in ids_over.items() if i in special),
        "components": [
            {
                "name": name,
                "median_abs": _round(float(m)),
                "max_abs": _round(float(mx)),
                "max_over_median": _round(float(mx / m)) if m > 0 else None,
                "tokens_over": int(n),
            }
            for name, m, mx, n in zip(store.components, median_C, max_C, over_C.cpu(), strict=True)
        ],
        "token_ids": [
            {
                "id": i,
                "token": t,
                "special": i in special,
                "tokens_over": ids_over[i],
                "occurrences": ids_all[i],
            }
            for i, t in zip(top, names, strict=True)
        ],
    }


def _round(v: float) -> float:
    return float(f"{v:.6g}")


def read(store_root: Path) -> dict[str, Any] | None:
    """The record of the store at ``store_root``, or None when it has none."""
    path = store_root / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def metrics(rec: dict[str, Any]) -> dict[str, float]:
    """Summary numbers of a record for MLflow."""
    ratios = [c["max_over_median"] for c in rec["components"] if c["max_over_median"] is not None]
    return {
        "outliers.tokens_over": float(rec["tokens_over"]),
        "outliers.tokens_over_first_position": float(rec["tokens_over_first_position"]),
        "outliers.tokens_over_special": float(rec["tokens_over_special"]),
        "outliers.components_over": float(sum(c["tokens_over"] > 0 for c in rec["components"])),
        "outliers.max_over_median_max": float(max(ratios, default=0.0)),
        "outliers.token_norm_median": float(rec["token_norm_median"]),
    }
