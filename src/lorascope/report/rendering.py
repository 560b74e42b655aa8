"""The dashboard's HTML: the template with its inline CSS and JS, ``#meta`` as JSON and ``#bulk``
as base64 of the gzip'd packed arrays, written atomically (``render``)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from lorascope.atomic import atomic_path
from lorascope.report.packing import Bulk, columns, leb128, quantise, uint

FORMAT = "lorascope-dashboard/1"
ASSETS = Path(__file__).with_name("dashboard")


def _script_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _json_for_script(obj: Any) -> str:
    """JSON that cannot end its ``<script>`` block (``<``, ``>`` and ``&`` escaped)."""
    text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _check_bulk(bulk: Bulk) -> None:
    """The bulk's parallel arrays agree (a mismatch would shift every later window in the viewer)."""
    import numpy as np

    ctx_tokens = int(np.asarray(bulk.ctx_lengths, np.int64).sum())
    if ctx_tokens != len(bulk.ctx_tokens) or len(bulk.ctx_acts) != len(bulk.ctx_tokens):
        raise ValueError("ctx_tokens, ctx_acts and ctx_lengths disagree")
    if int(np.asarray(bulk.seg_lengths, np.int64).sum()) != len(bulk.seg_tokens):
        raise ValueError("seg_tokens and seg_lengths disagree")


def _ranked_vocab(bulk: Bulk, ctx_ids: Any, seg_ids: Any) -> tuple[list[str], Any, Any]:
    """The vocabulary ranked by use, so frequent tokens get small ids (most take one or two LEB128
    bytes): ``(used tokens by rank, rank of each original id, UTF-16 length of each used token)``."""
    import numpy as np

    counts = np.bincount(np.concatenate([ctx_ids, seg_ids]), minlength=len(bulk.vocab))
    used = np.flatnonzero(counts)
    order = used[np.argsort(-counts[used], kind="stable")]
    rank = np.zeros(len(bulk.vocab), np.int64)
    rank[order] = np.arange(len(order))
    vocab = [bulk.vocab[i] for i in order]
    utf16 = np.array([len(s.encode("utf-16-le")) // 2 for s in vocab], np.int64)
    return vocab, rank, utf16


def _quantised_contexts(features: list[dict[str, Any]], bulk: Bulk, lengths: Any) -> tuple[Any, Any]:
    """Context activations as int8 relative to each feature's largest |activation| in its windows."""
    import numpy as np

    owner_ctx = np.full(len(lengths), -1, np.int64)
    for i, f in enumerate(features):
        first, count = f.get("ctx", (0, 0))
        owner_ctx[first : first + count] = i
    if (owner_ctx < 0).any():
        raise ValueError("every context must belong to one feature (meta features' ctx ranges)")
    return quantise(np.asarray(bulk.ctx_acts), np.repeat(owner_ctx, lengths), len(features))


def _quantised_samples(features: list[dict[str, Any]], bulk: Bulk) -> tuple[Any, Any]:
    """Each sampled feature's activations as int8 (in feature order); records in each feature's
    ``sample.a`` its offset into them."""
    import numpy as np

    owner_sample, offset = [], 0
    for i, f in enumerate(features):
        if f.get("sample"):
            f["sample"] = {**f["sample"], "a": offset}
            owner_sample.append(np.full(f["sample"]["len"], i, np.int64))
            offset += f["sample"]["len"]
    if offset != len(bulk.sample_acts):
        raise ValueError(f"sample_acts holds {len(bulk.sample_acts)} values, the samples {offset}")
    owners = np.concatenate(owner_sample) if owner_sample else np.zeros(0, np.int64)
    return quantise(np.asarray(bulk.sample_acts), owners, len(features))


def _quantised_heat(bulk: Bulk) -> tuple[Any, Any]:
    """Heatmap rows as int8 relative to each row's largest |value|; -128 marks a cell without a
    component."""
    import numpy as np

    heat = np.asarray(bulk.heat, np.float32)
    heat = heat.reshape(len(heat), -1) if heat.size else np.zeros((0, 0), np.float32)
    absent = np.isnan(heat)
    heat_scale = np.abs(np.where(absent, 0, heat)).max(1) if heat.size else np.zeros(len(heat), np.float32)
    safe = np.where(heat_scale > 0, heat_scale, 1.0)[:, None]
    heat_q = np.rint(np.where(absent, 0, heat) / safe * 127).clip(-127, 127).astype(np.int8)
    heat_q[absent] = -128
    return heat_q, heat_scale


def _pack(arrays: dict[str, Any], compresslevel: int) -> tuple[bytes, dict[str, list[Any]], int]:
    """The arrays little-endian, each at an 8-byte aligned offset (typed-array views need it), gzip'd
    (no mtime: the same bytes every time) and base64'd: ``(packed, {name: [offset, size, type]}, raw
    bytes)``."""
    import numpy as np

    dtypes = {"u1": "u8", "i1": "i8", "u2": "u16", "i2": "i16", "u4": "u32", "i4": "i32", "f4": "f32"}
    sections, chunks, size = {}, [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        sections[name] = [size, int(a.size), dtypes[a.dtype.str[1:]]]
        raw = a.tobytes()
        chunks.append(raw)
        size += len(raw)
        pad = -size % 8  # typed-array views need aligned offsets
        chunks.append(b"\0" * pad)
        size += pad
    return (
        base64.b64encode(gzip.compress(b"".join(chunks), compresslevel=compresslevel, mtime=0)),
        sections,
        size,
    )


def _html(meta: dict[str, Any], packed: bytes) -> str:
    """The template filled in one pass (text put in is never searched for markers again), with a CSP
    that allows exactly the inline script and style."""
    style = (ASSETS / "style.css").read_text(encoding="utf-8")
    script = (ASSETS / "app.js").read_text(encoding="utf-8")
    csp = f"default-src 'none'; script-src {_script_hash(script)}; style-src {_script_hash(style)}"
    fills = {
        "CSP": csp,
        "STYLE": style,
        "SCRIPT": script,
        "META": _json_for_script(meta),
        "BULK": packed.decode("ascii"),
        "TITLE": str(meta.get("title", "lorascope feature dashboard"))
        .replace("&", "&amp;")
        .replace("<", "&lt;"),
    }
    template = (ASSETS / "template.html").read_text(encoding="utf-8")
    # one pass: text put in is never searched for markers again
    return re.sub(r"__([A-Z]+)__", lambda m: fills.get(m[1], m[0]), template)


def render(meta: dict[str, Any], bulk: Bulk, out: Path, compresslevel: int = 9) -> int:
    """Write the dashboard of ``meta`` and ``bulk`` to ``out`` atomically; returns its size in bytes.

    ``meta``: ``title``; ``classes`` (``{"0": "monosemantic", ...}``); ``sources`` (``[{"name",
    "features"}]``, the source filter's options); ``missing`` (lines shown at the top); ``heatmap``
    (``{"layers": [...], "kinds": [...]}``: the grid of ``bulk.heat`` rows, layers x kinds, or None);
    ``features``: one dict per feature, in list order, with ``source``, ``id``, ``name``, ``sign``,
    ``layer``, ``component``, ``explanation``, ``class`` (0/1/2 or None), ``status``, ``error``,
    ``category``, ``subcategory``, ``detection``, ``detection_n``, ``density``, ``max``, ``top`` (token
    strings, searched), ``ctx`` (``[first, count]`` into the contexts of ``bulk``), ``hist``
    (``{"lo", "hi", "counts", "zeros", "tokens"}`` or None), ``sample`` (``{"seg", "off", "len",
    "peak", "doc", "doc_id", "pos", "act"}``: tokens ``off .. off + len`` of segment ``seg``, the
    strongest at ``peak``; or None) and ``heat`` (a row of ``bulk.heat`` or None). Other keys are kept.

    Adds to each feature its scales (``cs``: contexts, ``ss``: sample, ``hs``: heatmap; the int8 code
    127 stands for the scale) and its sample's offset into the sample activations (``sample.a``).
    """
    import numpy as np

    _check_bulk(bulk)
    features = [dict(f) for f in meta["features"]]
    lengths = np.asarray(bulk.ctx_lengths, np.int64)
    ctx_ids = np.asarray(bulk.ctx_tokens, np.int64)
    seg_ids = np.asarray(bulk.seg_tokens, np.int64)
    vocab, rank, utf16 = _ranked_vocab(bulk, ctx_ids, seg_ids)
    ctx_q, ctx_scale = _quantised_contexts(features, bulk, lengths)
    sample_q, sample_scale = _quantised_samples(features, bulk)
    heat_q, heat_scale = _quantised_heat(bulk)
    for i, f in enumerate(features):
        f["cs"] = float(ctx_scale[i])
        if f.get("sample"):
            f["ss"] = float(sample_scale[i])
        if f.get("heat") is not None:
            f["hs"] = float(heat_scale[f["heat"]])

    arrays = {
        "vocab_utf8": np.frombuffer("".join(vocab).encode("utf-8"), np.uint8),
        "vocab_len": uint(utf16),
        "ctx_ids": leb128(rank[ctx_ids]),
        "ctx_q": ctx_q,
        "ctx_len": uint(lengths),
        "ctx_peak": uint(np.asarray(bulk.ctx_peak, np.int64)),
        "ctx_act": np.asarray(bulk.ctx_activation, np.float32),
        "ctx_doc": np.asarray(bulk.ctx_doc, np.int32),
        "ctx_pos": np.asarray(bulk.ctx_position, np.int32),
        "seg_ids": leb128(rank[seg_ids]),
        "seg_len": np.asarray(bulk.seg_lengths, np.uint32),
        "sample_q": sample_q,
        "heat_q": heat_q.reshape(-1),
    }
    packed, sections, size = _pack(arrays, compresslevel)
    bulk_info = {"sections": sections, "vocab": len(vocab), "tokens": len(ctx_ids),
                 "segment_tokens": len(seg_ids), "raw_bytes": size}  # fmt: skip
    meta = {**meta, "format": FORMAT, "features": columns(features), "bulk": bulk_info}
    data = _html(meta, packed).encode("utf-8")
    with atomic_path(out, ".html") as tmp:
        tmp.write_bytes(data)
    return len(data)
