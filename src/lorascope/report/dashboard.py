"""The offline feature dashboard: one self-contained HTML file (``reports/dashboard.html``).

Per feature (LoRA direction signs, MLP neuron signs, live SAE latents: ``models/sae/alive.json``; a label
of a dead latent is dropped and counted in ``#meta`` ``sae_latents``) it shows the label (explanation, class,
category, detection score), the layer and component, an activation histogram over the first
``report.histogram_tokens`` tokens of the store, the top ``report.contexts_per_feature`` contexts with
every token coloured by its activation, one training sample (the document of the feature's strongest
activation in those tokens, at most ``report.sample_tokens`` tokens centred on it) and, for an SAE
latent, its decoder vector as a layer x component-type heatmap. The list is searchable and filterable.

The file works offline and makes no request: CSS and JS are inline (a Content-Security-Policy allows
only those two blocks, by hash, and nothing else) and the data is embedded in two script blocks:

* ``#meta``: JSON with the sources, the features as columns (labels, categories, histograms, top
  tokens, per feature scales and offsets into the arrays; ``rows_of`` turns them back into dicts) and
  the table of contents of the bulk arrays;
* ``#bulk``: base64 of a gzip of the bulk arrays (see ``render``): token ids of a per-dashboard
  vocabulary of the token strings used (ranked by frequency, LEB128: one byte for the 128 most frequent
  strings, two for the next 16K), activations as int8 relative to each feature's largest |activation|
  (its scale in ``#meta``), and the exact activation of each context's selected token as float32.

The page decodes ``#bulk`` with ``DecompressionStream`` (no network), builds the list lazily (200 rows,
then "show more") and renders a feature's detail only when it is selected. All text is put in the
page with ``textContent`` (never parsed as HTML), so explanations and tokens cannot inject markup.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorascope import paths
from lorascope.components import parse_name
from lorascope.errors import LorascopeError
from lorascope.report.packing import Bulk
from lorascope.report.params import ReportSection
from lorascope.report.rendering import render
from lorascope.sections import LORA_TARGETS

if TYPE_CHECKING:
    import numpy as np

CLASSES = {0: "monosemantic", 1: "broad but consistent", 2: "polysemantic"}
TOP_TOKENS = 8
"""Distinct selected tokens of the top contexts kept per feature (shown and searched)."""
BLOCK_ELEMENTS = 1 << 22
"""Store values (tokens x feature columns) scanned at once for the histograms."""


# ------------------------------------------------------------------------------------------- build
@dataclass
class DashboardInfo:
    """What ``build`` wrote."""

    path: Path
    bytes: int
    sources: list[str]
    """Sources included, in order."""
    features: dict[str, int]
    """Features shown per included source."""
    contexts: int
    """Context windows embedded, all sources together."""
    missing: list[str] = field(default_factory=list)
    """Human-readable reasons for what is not shown: skipped sources (no label set or contexts) and
    parts left out (no store: no histograms or samples; no categories; no SAE heatmaps)."""


class _Collector:
    """Features and their bulk arrays, accumulated source by source."""

    def __init__(self) -> None:
        self.features: list[dict[str, Any]] = []
        self.vocab: dict[str, int] = {}
        self.ctx: dict[str, list[Any]] = {
            k: [] for k in ("tokens", "acts", "lengths", "peak", "act", "doc", "pos")
        }
        self.n_ctx = 0
        self.seg_tokens: list[Any] = []
        self.seg_lengths: list[int] = []
        self.sample_acts: list[Any] = []
        self.heat: list[Any] = []

    def ids(self, strings: Any) -> np.ndarray:
        """Vocabulary ids of a pyarrow string array (or list of str)."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        arr = pa.array(strings, pa.string()) if not isinstance(strings, pa.Array) else strings
        if len(arr) == 0:
            return np.zeros(0, np.int64)
        enc = pc.dictionary_encode(arr.fill_null(""))
        lookup = np.array(
            [self.vocab.setdefault(s, len(self.vocab)) for s in enc.dictionary.to_pylist()], np.int64
        )
        return lookup[enc.indices.to_numpy(zero_copy_only=False)]

    def bulk(self) -> Bulk:
        import numpy as np

        def cat(parts: list[Any], dtype: Any) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        width = max((len(h) for h in self.heat), default=0)
        return Bulk(
            vocab=list(self.vocab),
            ctx_tokens=cat(self.ctx["tokens"], np.int64),
            ctx_acts=cat(self.ctx["acts"], np.float32),
            ctx_lengths=cat(self.ctx["lengths"], np.int64),
            ctx_peak=cat(self.ctx["peak"], np.int64),
            ctx_activation=cat(self.ctx["act"], np.float32),
            ctx_doc=cat(self.ctx["doc"], np.int32),
            ctx_position=cat(self.ctx["pos"], np.int32),
            seg_tokens=cat(self.seg_tokens, np.int64),
            seg_lengths=np.asarray(self.seg_lengths, np.int64),
            sample_acts=cat(self.sample_acts, np.float32),
            heat=np.asarray(self.heat, np.float32).reshape(len(self.heat), width),
        )


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _num(x: Any) -> float | None:
    """A finite float or None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _categories(root: Path, missing: list[str]) -> dict[tuple[str, int, int], tuple[str | None, str | None]]:
    import pyarrow.parquet as pq

    path = root / paths.ASSIGNMENTS
    if not path.is_file():
        missing.append(f"categories: {_rel(root, path)} not found (no categories shown)")
        return {}
    try:
        rows = pq.read_table(
            path, columns=["source", "feature", "sign", "category", "subcategory"]
        ).to_pylist()
    except Exception as e:  # noqa: BLE001 - a broken optional input never stops the dashboard
        missing.append(f"categories: {_rel(root, path)} unreadable ({type(e).__name__}: {e})")
        return {}
    return {(r["source"], int(r["feature"]), int(r["sign"])): (r["category"], r["subcategory"]) for r in rows}


def _labels(path: Path, max_features: int | None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    wanted = ("feature", "feature_name", "sign", "layer", "component", "explanation", "classification",
              "status", "error", "detection_balanced_accuracy", "detection_n")  # fmt: skip
    names = pq.read_schema(path).names
    for c in ("feature", "feature_name", "sign"):
        if c not in names:
            raise LorascopeError(f"{path.name} has no column {c!r}")
    rows = pq.read_table(path, columns=[c for c in wanted if c in names]).to_pylist()
    rows.sort(key=lambda r: (int(r["feature"]), -int(r["sign"])))
    return rows[:max_features] if max_features else rows


def _top_contexts(path: Path, keys: list[tuple[int, int]], per_feature: int) -> Any:
    """The ``top`` rows of the wanted features, rank < ``per_feature``, sorted by (feature, -sign, rank)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cols = ["feature", "sign", "kind", "rank", "doc_index", "position", "activation", "window_start",
            "window_acts", "tokens"]  # fmt: skip
    table = pq.read_table(path, columns=cols, filters=[("kind", "=", "top"), ("rank", "<", per_feature)])
    table = table.filter(
        pc.is_in(table["feature"], pa.array(sorted({f for f, _ in keys}), table["feature"].type))
    )
    neg_sign = pc.negate(table["sign"].cast(pa.int32()))
    table = table.append_column("neg_sign", neg_sign)
    return table.sort_by([("feature", "ascending"), ("neg_sign", "ascending"), ("rank", "ascending")])


def _store_pass(
    src: Any, columns: list[int], lo: np.ndarray, hi: np.ndarray, signs: list[int], cfg: ReportSection
) -> tuple[np.ndarray, np.ndarray, int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """One pass over the first ``histogram_tokens`` tokens: per column a histogram of its nonzero values
    over [lo, hi], its count of exact zeros, and per sign the strongest activation and its token."""
    import numpy as np
    import torch

    bins, limit = cfg.histogram_bins, cfg.histogram_tokens
    cols = torch.tensor(columns, dtype=torch.long)
    n = len(columns)
    lo_t = torch.tensor(lo, dtype=torch.float32)
    width = torch.tensor(np.where(hi > lo, hi - lo, 1.0), dtype=torch.float32)
    hist = torch.zeros(n * bins, dtype=torch.long)
    zeros = torch.zeros(n, dtype=torch.long)
    best = {s: (torch.full((n,), float("-inf")), torch.full((n,), -1, dtype=torch.long)) for s in signs}
    offsets = torch.arange(n) * bins
    block = max(1, BLOCK_ELEMENTS // max(n, len(src.features), len(src.store.components)))
    seen = 0
    from lorascope.progress import track

    with torch.no_grad():
        for shard in track(src.store.shards, "dashboard: histograms", total=len(src.store.shards)):
            if seen >= limit:
                break
            take = min(shard.tokens, limit - seen)
            acts_TC, _ = src.store.read(shard)
            for b0 in range(0, take, block):
                b1 = min(take, b0 + block)
                x = acts_TC[b0:b1].float()
                v = (src.encode(x) if src.encode is not None else x)[:, cols]
                nz = v != 0
                zeros += (~nz).sum(0)
                idx = ((v - lo_t) / width * bins).floor().clamp(0, bins - 1).long() + offsets
                hist += torch.bincount(idx[nz], minlength=n * bins)
                for s, (val, pos) in best.items():
                    m, i = (v * s).max(0)
                    better = m > val
                    val[better] = m[better]
                    pos[better] = i[better] + shard.start + b0
            seen += take
    return (
        hist.view(n, bins).numpy(),
        zeros.numpy(),
        seen,
        {s: (val.numpy(), pos.numpy()) for s, (val, pos) in best.items()},
    )


def _samples(
    src: Any, renderer: Any, wanted: list[tuple[int, int, int]], sample_tokens: int
) -> tuple[list[dict[str, Any]], list[tuple[Any, Any]], dict[int, tuple[int, int, Any]]]:
    """Cut the training samples. ``wanted``: (feature index, column, global peak token) per feature.

    Returns the segments (one per document: ``doc``, ``doc_id``, ``start``, ``length``), their (token
    ids, pieces), and per feature index ``(segment, offset, activations over its span)``."""
    import bisect

    import numpy as np
    import torch

    docs = src.store.documents
    starts = [d[1] for d in docs]
    spans: dict[int, list[tuple[int, int, int, int]]] = {}  # doc -> [(feature index, column, a, b)]
    for fi, column, g in wanted:
        d = bisect.bisect_right(starts, g) - 1
        s, length = docs[d][1], docs[d][2]
        a = max(s, min(g - sample_tokens // 2, s + length - sample_tokens))
        spans.setdefault(d, []).append((fi, column, a, min(s + length, a + sample_tokens)))
    shards = src.store.shards
    shard_of: dict[int, list[int]] = {}
    for d in spans:
        shard_of.setdefault(next(sh for sh in shards if sh.first_doc <= d < sh.last_doc).index, []).append(d)
    segments: list[dict[str, Any]] = []
    seg_data: list[tuple[Any, Any]] = []
    per_feature: dict[int, tuple[int, int, Any]] = {}
    with torch.no_grad():
        for si in sorted(shard_of):
            shard = shards[si]
            acts_TC, ids_T = src.store.read(shard)
            for d in sorted(shard_of[si]):
                items = spans[d]
                a0, b0 = min(a for *_, a, _ in items), max(b for *_, b in items)
                rows = slice(a0 - shard.start, b0 - shard.start)
                x = acts_TC[rows].float()
                columns = torch.tensor([c for _, c, _, _ in items], dtype=torch.long)
                values = (src.encode(x) if src.encode is not None else x)[:, columns].numpy()
                ids = ids_T[rows].tolist()
                _, pieces = renderer.render(ids)
                seg = len(segments)
                segments.append(
                    {"doc": d, "doc_id": str(docs[d][0]), "start": a0 - docs[d][1], "length": b0 - a0}
                )
                seg_data.append((ids, pieces))
                for j, (fi, _column, a, b) in enumerate(items):
                    per_feature[fi] = (seg, a - a0, np.asarray(values[a - a0 : b - a0, j], np.float32))
    return segments, seg_data, per_feature


def _heatmap(root: Path, ids: list[int]) -> tuple[dict[str, Any], list[list[float]]]:
    """The SAE decoder rows of latents ``ids`` on a layer x component-type grid."""
    from lorascope.sae.load import load_sae

    sae, cfg = load_sae(root / paths.SAE)
    W = sae.W_dec_FD.detach().float().numpy()
    cells = []
    for name in cfg["components"]:
        parsed = parse_name(name)
        if parsed is None or parsed.index is not None or parsed.sign is not None:
            raise LorascopeError(
                f"{paths.SAE.as_posix()}/cfg.json: component {name!r} is not L<layer>.<kind>"
            )
        cells.append((parsed.layer, parsed.kind))
    layers = sorted({layer for layer, _ in cells})
    kinds = [k for k in LORA_TARGETS if any(k == c for _, c in cells)]
    kinds += sorted({c for _, c in cells} - set(kinds))
    where = [layers.index(layer) * len(kinds) + kinds.index(kind) for layer, kind in cells]
    rows = []
    for f in ids:
        row = [math.nan] * (len(layers) * len(kinds))
        for c, w in enumerate(where):
            row[w] = float(W[f, c])
        rows.append(row)
    return {"layers": layers, "kinds": kinds}, rows


def _why(e: Exception) -> str:
    return str(e) if isinstance(e, LorascopeError) else f"{type(e).__name__}: {e}"


def _source_labels(
    root: Path, source: str, cfg: ReportSection, meta: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[tuple[int, int], dict[str, Any]]]:
    """``source``'s labels (SAE: live latents only, the dropped ones counted in ``meta``) and its
    features table by ``(feature, sign)``; a missing label set, contexts or features table skips it."""
    import pyarrow.parquet as pq

    labels_path = root / paths.labels(source)
    stats_path = root / paths.features(source)
    for p in (labels_path, root / paths.contexts(source), stats_path):
        if not p.is_file():
            raise LorascopeError(f"{_rel(root, p)} not found")
    labels = _labels(labels_path, cfg.max_features)
    if source == "sae":  # live latents only (models/sae/alive.json), as every stage before
        from lorascope.sae.load import alive_latents, read_cfg

        alive = set(alive_latents(root / paths.SAE))
        d_sae = int(read_cfg(root / paths.SAE)["d_sae"])
        kept = [r for r in labels if int(r["feature"]) in alive]
        meta["sae_latents"] = {"d_sae": d_sae, "alive": len(alive), "dead": d_sae - len(alive),
                               "dead_labels_dropped": len(labels) - len(kept)}  # fmt: skip
        labels = kept
    stats = {
        (int(r["feature"]), int(r["sign"])): r
        for r in pq.read_table(stats_path, columns=["feature", "sign", "max", "min", "density"]).to_pylist()
    }
    return labels, stats


@dataclass
class _Contexts:
    """A source's top contexts (grouped by feature and sign in label order) as flat arrays: per window
    its length, selected token's offset (``peak``) and position; per token its vocabulary id and
    activation."""

    table: Any
    row_key: Any
    """``feature * 2 + (sign < 0)`` per window: the group a window belongs to (sorted)."""
    lengths: Any
    tokens: Any
    acts: Any
    position: Any
    peak: Any


def _read_contexts(
    root: Path, source: str, keys: list[tuple[int, int]], cfg: ReportSection, out: _Collector
) -> _Contexts:
    """The top contexts of ``keys``, checked (tokens and activations agree, the selected token lies in
    its window); the token strings join ``out``'s vocabulary."""
    import numpy as np
    import pyarrow.compute as pc

    ctx_path = root / paths.contexts(source)
    table = _top_contexts(ctx_path, keys, cfg.contexts_per_feature)
    feat = table["feature"].to_numpy().astype(np.int64)
    sign = table["sign"].to_numpy().astype(np.int64)
    lengths = pc.list_value_length(table["tokens"]).to_numpy(zero_copy_only=False).astype(np.int64)
    acts_len = pc.list_value_length(table["window_acts"]).to_numpy(zero_copy_only=False).astype(np.int64)
    if not np.array_equal(lengths, acts_len):
        raise LorascopeError(f"{_rel(root, ctx_path)}: tokens and window_acts differ in length")
    tokens = out.ids(pc.list_flatten(table["tokens"]))
    acts = pc.list_flatten(table["window_acts"]).to_numpy(zero_copy_only=False).astype(np.float32)
    position = table["position"].to_numpy().astype(np.int64)
    peak = position - table["window_start"].to_numpy().astype(np.int64)
    if ((peak < 0) | (peak >= lengths)).any():
        raise LorascopeError(f"{_rel(root, ctx_path)}: a selected token lies outside its window")
    return _Contexts(table, feat * 2 + (sign < 0), lengths, tokens, acts, position, peak)


def _feature_rows(
    source: str,
    labels: list[dict[str, Any]],
    ctx: _Contexts,
    stats: dict[tuple[int, int], dict[str, Any]],
    categories: dict[tuple[str, int, int], tuple[str | None, str | None]],
    vocab: list[str],
) -> tuple[list[dict[str, Any]], Any]:
    """One dashboard row per label (its contexts' range, their most selected tokens, its statistics
    and category), and which context windows are kept: those of features not in the label set (dead,
    or past ``max_features``) are dropped."""
    import numpy as np

    tok_start = np.concatenate([[0], np.cumsum(ctx.lengths)])
    keep = np.zeros(len(ctx.lengths), bool)
    features, first = [], 0
    for r in labels:
        f, s = int(r["feature"]), int(r["sign"])
        k = f * 2 + (s < 0)
        lo, hi = int(np.searchsorted(ctx.row_key, k, "left")), int(np.searchsorted(ctx.row_key, k, "right"))
        keep[lo:hi] = True
        picked = Counter(int(ctx.tokens[tok_start[j] + ctx.peak[j]]) for j in range(lo, hi))
        st = stats.get((f, s), {})
        cat, sub = categories.get((source, f, s), (None, None))
        cls = r.get("classification")
        features.append({
            "source": source, "id": f, "name": r["feature_name"], "sign": s,
            "layer": None if r.get("layer") is None else int(r["layer"]), "component": r.get("component"),
            "explanation": r.get("explanation"), "class": None if cls is None else int(cls),
            "status": r.get("status"), "error": r.get("error"), "category": cat, "subcategory": sub,
            "detection": _num(r.get("detection_balanced_accuracy")), "detection_n": r.get("detection_n"),
            "density": _num(st.get("density")), "max": _num(st.get("max")),
            "top": [vocab[t] for t, _ in picked.most_common(TOP_TOKENS)],
            "ctx": [first, hi - lo], "hist": None, "sample": None, "heat": None,
        })  # fmt: skip
        first += hi - lo
    return features, keep


def _sae_heat(
    root: Path, features: list[dict[str, Any]], meta: dict[str, Any], missing: list[str]
) -> list[list[float]]:
    """The SAE latents' decoder heatmaps (their grid into ``meta``); none, with the reason in
    ``missing``, when they cannot be made."""
    try:
        grid, heat = _heatmap(root, [f["id"] for f in features])
    except Exception as e:  # noqa: BLE001
        missing.append(f"sae: no decoder heatmaps ({_why(e)})")
        return []
    meta["heatmap"] = grid
    return heat


def _commit(
    out: _Collector,
    features: list[dict[str, Any]],
    ctx: _Contexts,
    keep: Any,
    samples: tuple[list[dict[str, Any]], list[Any], list[Any]],
    heat: list[list[float]],
    meta: dict[str, Any],
) -> None:
    """Append a source's features and arrays to ``out``, shifting its local offsets (contexts,
    segments, heatmap rows) by what earlier sources added."""
    import numpy as np

    segments, seg_ids, sample_acts = samples
    seg_base, ctx_base = len(out.seg_lengths), out.n_ctx
    for feature in features:
        feature["ctx"][0] += ctx_base
        if feature["sample"] is not None:
            feature["sample"]["seg"] += seg_base
    for i, feature in enumerate(features if heat else []):
        feature["heat"] = len(out.heat) + i
    out.heat.extend(heat)
    tok_keep = np.repeat(keep, ctx.lengths)
    out.ctx["tokens"].append(ctx.tokens[tok_keep])
    out.ctx["acts"].append(ctx.acts[tok_keep])
    out.ctx["lengths"].append(ctx.lengths[keep])
    out.ctx["peak"].append(ctx.peak[keep])
    out.ctx["act"].append(ctx.table["activation"].to_numpy().astype(np.float32)[keep])
    out.ctx["doc"].append(ctx.table["doc_index"].to_numpy()[keep])
    out.ctx["pos"].append(ctx.position[keep])
    out.n_ctx += int(keep.sum())
    out.seg_tokens.extend(seg_ids)
    out.seg_lengths.extend(len(ids) for ids in seg_ids)
    out.sample_acts.extend(sample_acts)
    meta.setdefault("segments", []).extend(segments)
    out.features.extend(features)


def _add_source(
    root: Path,
    source: str,
    cfg: ReportSection,
    out: _Collector,
    categories: dict[tuple[str, int, int], tuple[str | None, str | None]],
    renderer: Any,
    missing: list[str],
    meta: dict[str, Any],
) -> int:
    """Add ``source``'s features to ``out``; returns how many. Raises for a source that is skipped
    (then nothing of it is added)."""
    labels, stats = _source_labels(root, source, cfg, meta)
    ctx = _read_contexts(root, source, [(int(r["feature"]), int(r["sign"])) for r in labels], cfg, out)
    features, keep = _feature_rows(source, labels, ctx, stats, categories, list(out.vocab))

    # --- histograms and training samples: one pass over the start of the store
    samples: tuple[list[dict[str, Any]], list[Any], list[Any]] = ([], [], [])
    try:
        samples = _store_features(root, source, cfg, out, features, stats, renderer, meta)
    except Exception as e:  # noqa: BLE001 - the labels and contexts still make a useful dashboard
        missing.append(f"{source}: no histograms or training samples ({_why(e)})")
        for feature in features:
            feature["hist"] = feature["sample"] = None

    heat = _sae_heat(root, features, meta, missing) if source == "sae" else []
    # nothing of the source is in ``out`` before this point, except vocabulary entries
    _commit(out, features, ctx, keep, samples, heat, meta)
    return len(features)


def _store_features(
    root: Path,
    source: str,
    cfg: ReportSection,
    out: _Collector,
    features: list[dict[str, Any]],
    stats: dict[tuple[int, int], dict[str, Any]],
    renderer: Any,
    meta: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[Any], list[Any]]:
    """Set each feature's ``hist`` and ``sample`` (segment indices local to the source); returns the
    segments, their vocabulary ids and the sample activations in feature order."""
    import numpy as np

    from lorascope.sources import open_source

    if renderer is None:
        raise LorascopeError(f"{paths.BASE.as_posix()}: no tokenizer")
    src = open_source(source, root)
    columns = sorted({f["id"] for f in features})
    for c in columns:
        if not 0 <= c < len(src.features):
            raise LorascopeError(f"feature {c} is not in the store ({len(src.features)} features)")
    where = {c: i for i, c in enumerate(columns)}
    # each column's raw range over the whole store (for a signed source the + row holds it)
    lo = np.zeros(len(columns), np.float64)
    hi = np.ones(len(columns), np.float64)
    for c, i in where.items():
        pos, neg = stats.get((c, 1)) or {}, stats.get((c, -1)) or {}
        if pos.get("min") is not None and pos.get("max") is not None:
            lo[i], hi[i] = float(pos["min"]), float(pos["max"])
        elif neg.get("min") is not None and neg.get("max") is not None:
            lo[i], hi[i] = -float(neg["max"]), -float(neg["min"])
    signs = sorted({f["sign"] for f in features}, reverse=True)
    hist, zeros, seen, best = _store_pass(src, columns, lo, hi, signs, cfg)
    wanted = []
    for fi, f in enumerate(features):
        i = where[f["id"]]
        f["hist"] = {
            "lo": float(lo[i]), "hi": float(hi[i]), "counts": hist[i].tolist(), "zeros": int(zeros[i]), "tokens": seen,
        }  # fmt: skip
        val, at = best[f["sign"]]
        if val[i] > 0:
            wanted.append((fi, f["id"], int(at[i])))
    segments, seg_data, per_feature = _samples(src, renderer, wanted, cfg.sample_tokens)
    seg_ids = [out.ids(pieces) for _, pieces in seg_data]
    sample_acts = []
    for fi, (seg, off, values) in sorted(per_feature.items()):
        peak = int(np.argmax(values * features[fi]["sign"]))
        info = segments[seg]
        features[fi]["sample"] = {
            "seg": seg, "off": off, "len": len(values), "peak": peak, "doc": info["doc"],
            "doc_id": info["doc_id"], "pos": info["start"] + off, "act": float(values[peak]),
        }  # fmt: skip
        sample_acts.append(values)
    meta.setdefault("stores", {})[source] = {"tokens": src.store.tokens, "scanned": seen}
    return segments, seg_ids, sample_acts


def _attach_attribution(root: Path, features: list[dict[str, Any]], missing: list[str]) -> None:
    """Each feature's unit effects from ``attribute`` (a LoRA direction's are its component's): screen rank
    and ΔCE, exact ΔCE and KL, Δaccuracy with its CI; ``attr`` is None for a unit it did not reach."""
    import json

    files = [root / paths.ATTRIBUTE_SCREEN, root / paths.ATTRIBUTE_EXACT, root / paths.ATTRIBUTE_ACCURACY]
    if not all(f.is_file() for f in files):
        missing.append("attribution: metrics/attribute/ not found (run `lorascope attribute`)")
        return
    screen, exact, accuracy = (json.loads(f.read_text()) for f in files)
    by_unit: dict[str, dict[str, Any]] = {
        u["unit"]: {
            "rank": u["rank"],
            "screened": u["screened_delta_ce"],
            "units": len(screen["units"]),
            "delta_ce": None,
            "kl": None,
            "delta_accuracy": None,
            "ci": None,
        }  # fmt: skip
        for u in screen["units"]
    }
    for u in exact["units"]:
        by_unit[u["unit"]].update(delta_ce=u["delta_ce"], kl=u["kl"])
    for name, u in accuracy.get("units", {}).items():
        by_unit[name].update(delta_accuracy=u["delta_accuracy"], ci=u["delta_accuracy_ci"])
    for f in features:
        unit = f"sae.{f['id']}" if f["source"] == "sae" else str(f["name"]).rstrip("+-")
        f["attr"] = by_unit.get(unit) if f["source"] in ("sae", "lora") else None


def build(root: Path, cfg: ReportSection, out: Path) -> DashboardInfo:
    """Write the dashboard of the workspace at ``root`` to ``out`` (atomically).

    Sources (``cfg.dashboard_sources``) whose label set (``data/interp/<source>.parquet``) or contexts
    (``data/contexts/<source>.parquet`` and ``.features.parquet``) are missing or unreadable are skipped
    and listed in ``missing``; so are the parts that need other inputs (the activation store and
    ``models/base`` for histograms and samples, ``models/sae`` for heatmaps, the category assignments).
    """
    root = Path(root)
    missing: list[str] = []
    categories = _categories(root, missing)
    renderer = None
    try:
        from lorascope.models import load_tokenizer
        from lorascope.tokens import TokenRenderer

        renderer = TokenRenderer(load_tokenizer(root / paths.BASE))
    except Exception as e:  # noqa: BLE001 - only the training samples need it
        missing.append(f"tokenizer: models/base unusable ({_why(e)}); no training samples")
    collector = _Collector()
    meta: dict[str, Any] = {
        "title": "lorascope feature dashboard",
        "classes": {str(k): v for k, v in CLASSES.items()},
        "settings": cfg.model_dump(mode="json"),
        "sources": [],
        "missing": missing,
        "heatmap": None,
        "segments": [],
        "stores": {},
    }
    counts: dict[str, int] = {}
    for source in cfg.dashboard_sources:
        try:
            n = _add_source(root, source, cfg, collector, categories, renderer, missing, meta)
        except Exception as e:  # noqa: BLE001 - one broken source never stops the others
            why = str(e) if isinstance(e, LorascopeError) else f"unreadable ({_why(e)})"
            missing.append(f"{source}: {why}")
            continue
        counts[source] = n
        entry: dict[str, Any] = {"name": source, "features": n}
        if source == "sae" and meta.get("sae_latents"):
            entry["live_latents"] = meta["sae_latents"]["alive"]
        meta["sources"].append(entry)
    _attach_attribution(root, collector.features, missing)
    size = render({**meta, "features": collector.features}, collector.bulk(), out)
    return DashboardInfo(
        path=out, bytes=size, sources=list(counts), features=counts, contexts=collector.n_ctx, missing=missing
    )
