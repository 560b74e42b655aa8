"""Run the ``contexts`` stage: one streaming pass over a store -> ``data/contexts/<source>.parquet``.

Outputs (one row per kept token in the contexts table, one row per feature sign in the features
table):

* ``<source>.parquet``: feature, feature_name, sign, kind (top | quantile | random), rank, doc_id,
  doc_index, position, activation, window_start, window_ids, window_acts, quantile_bin (-1 for top
  and random rows), text, tokens (per-token strings whose concatenation is ``text``);
* ``<source>.features.parquet``: feature, feature_name, sign, max, density (tokens activating the
  feature sign), nonzero_density, mean, std, min, tokens.

``--source sae`` keeps only the live latents (``models/sae/alive.json``; ``feature`` is the latent's index):
a dead latent has no row in either table, and how many were left out is the run's ``dead_latents_skipped``
metric and, with the live count, the features table's parquet metadata (``LATENTS_KEY``).

Tokens the ``contexts.exclude`` policy names (first positions, special tokens, a norm cut: outliers such
as attention sinks) are never selected and not counted in the statistics (``tokens`` is the kept
count); how many were left out, per reason, is in the run's ``excluded_*`` metrics and the features
table's metadata (``EXCLUDED_KEY``).

The selection state is saved after every shard to ``checkpoints/contexts/<source>.pt``; a killed run
resumes there and ends with the same tables.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from lorascope import kernels, paths, resume
from lorascope.config import Params
from lorascope.contexts.selection import GROUPS, PAD_ID, Selector, ShardView
from lorascope.contexts.tables import EXCLUDED_KEY, LATENTS_KEY
from lorascope.extract.store import Shard
from lorascope.project import workspace_root
from lorascope.sources import FeatureSource, open_source

if TYPE_CHECKING:
    from lorascope.contexts.params import ContextsSection
    from lorascope.exclusion import Exclusion
    from lorascope.extract.store import Store

BASE = paths.BASE
CONTEXTS_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("feature_name", pa.string()),
        ("sign", pa.int8()),
        ("kind", pa.string()),
        ("rank", pa.int32()),
        ("doc_id", pa.string()),
        ("doc_index", pa.int32()),
        ("position", pa.int32()),
        ("activation", pa.float32()),
        ("window_start", pa.int32()),
        ("window_ids", pa.list_(pa.int32())),
        ("window_acts", pa.list_(pa.float32())),
        ("quantile_bin", pa.int16()),
        ("text", pa.string()),
        ("tokens", pa.list_(pa.string())),
    ]
)
FEATURES_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("feature_name", pa.string()),
        ("sign", pa.int8()),
        ("max", pa.float32()),
        ("density", pa.float64()),
        ("nonzero_density", pa.float64()),
        ("mean", pa.float64()),
        ("std", pa.float64()),
        ("min", pa.float32()),
        ("tokens", pa.int64()),
    ]
)


def out_paths(source: str) -> tuple[Path, Path]:
    """``(contexts table, features table)`` of ``source``."""
    root = workspace_root()
    return root / paths.contexts(source), root / paths.features(source)


def checkpoint_path(source: str) -> Path:
    return workspace_root() / paths.checkpoints("contexts") / f"{source}.pt"


def token_keys(seed: int, shard: Shard) -> Any:
    """One uniform key per token of ``shard`` (seeded by the shard, so resuming reproduces them)."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + shard.index)
    return torch.rand(shard.tokens, generator=generator)


def _load_checkpoint(path: Path, claimed: bool, selector: Selector) -> int:
    """Restore the state saved after the last finished shard when the run's claim kept it (a run with
    the same params and inputs left it); returns the next shard index (0: start over)."""
    import torch

    if not claimed or not path.is_file():
        return 0
    saved = torch.load(path, weights_only=True, map_location="cpu")
    selector.state = {k: v.to(selector.device) for k, v in saved["state"].items()}
    return int(saved["next_shard"])


def _save_checkpoint(path: Path, selector: Selector, next_shard: int) -> None:
    import torch

    from lorascope.atomic import atomic_path

    with atomic_path(path) as tmp:
        state = {k: v.cpu() for k, v in selector.state.items()}  # resumable on any device
        torch.save({"state": state, "next_shard": next_shard}, tmp)


def _select(
    cfg: ContextsSection,
    features: FeatureSource,
    selector: Selector,
    exclusion: Exclusion,
    start_shard: int,
    ckpt: Path,
    device: Any,
    on_shard: Callable[[Shard], None] | None,
) -> None:
    """Stream the store's shards from ``start_shard`` to the device and update the selection with each
    (tokens the exclusion policy names left out), saving the state after every shard."""
    from lorascope.devices import prefetched
    from lorascope.progress import track

    store = features.store
    shards = store.shards
    todo = prefetched(shards[start_shard:], store.read, device)  # shards streamed to the device
    for shard, (acts_TC, ids_T) in track(todo, f"contexts {features.name}", total=len(shards) - start_shard):
        lengths = [d[2] for d in store.documents[shard.first_doc : shard.last_doc]]
        view = ShardView.build(shard.start, acts_TC, ids_T, lengths)
        reasons = exclusion.reasons(acts_TC, view.ids_T, store.document_starts(shard))
        selector.update(view, features.encode, token_keys(cfg.seed, shard), reasons)
        _save_checkpoint(ckpt, selector, shard.index + 1)
        if on_shard is not None:
            on_shard(shard)


def _excluded(selector: Selector, store: Store) -> dict[str, int]:
    """Tokens the exclusion policy left out, in all and per reason; a policy that leaves no token is a
    one-line error."""
    from lorascope.errors import LorascopeError
    from lorascope.exclusion import REASONS

    excluded = {"excluded": int(selector.state["excluded"])}
    excluded |= {r: int(selector.state[f"excluded.{r}"]) for r in REASONS}
    if int(selector.state["tokens"]) == 0 and excluded["excluded"]:
        by = ", ".join(f"{r} {excluded[r]}" for r in REASONS)
        raise LorascopeError(
            f"contexts.exclude: leaves no tokens in {store.root} ({excluded['excluded']} of {store.tokens} "
            f"excluded: {by})"
        )
    return excluded


def _write_tables(
    source: str, selector: Selector, features: FeatureSource, renderer: Any, excluded: dict[str, int]
) -> tuple[Any, Any]:
    """Write the contexts and features tables (the latter's metadata: what was excluded and, for the SAE,
    the live and dead latents); returns both tables."""
    contexts_path, features_path = out_paths(source)
    table = contexts_table(selector, features, renderer)
    stats = features_table(selector, features)
    meta = {EXCLUDED_KEY: json.dumps(excluded, sort_keys=True).encode()}
    if source == "sae":
        counts = {"d_sae": len(features.features) + features.dead, "alive": len(features.features),
                  "dead": features.dead}  # fmt: skip
        meta[LATENTS_KEY] = json.dumps(counts).encode()
    stats = stats.replace_schema_metadata(meta)
    _write_parquet(contexts_path, table)
    _write_parquet(features_path, stats)
    return table, stats


def _metrics(
    features: FeatureSource, table: Any, stats: Any, excluded: dict[str, int], start_shard: int
) -> dict[str, float]:
    """The run's metrics: features, tokens and rows, dead features, exclusions, the shard resumed at."""
    from lorascope.exclusion import REASONS

    return {
        "features": float(len(features.features) * len(features.signs)),
        "tokens": float(features.store.tokens),
        "rows": float(table.num_rows),
        "dead_features": float(sum(1 for d in stats.column("density").to_pylist() if d == 0)),
        "dead_latents_skipped": float(features.dead),
        "excluded_tokens": float(excluded["excluded"]),
        **{f"excluded_{r}": float(excluded[r]) for r in REASONS},
        "resumed_from_shard": float(start_shard),
    }


def run(params: Params, source: str, on_shard: Callable[[Shard], None] | None = None) -> Path:
    """Select contexts for every feature of ``source``; returns the contexts table path.
    ``on_shard`` runs after each shard's state is saved (the tests use it to simulate a kill)."""
    import mlflow

    from lorascope.devices import resolve
    from lorascope.exclusion import Exclusion
    from lorascope.models import load_tokenizer
    from lorascope.tokens import TokenRenderer
    from lorascope.tracking import stage_run

    cfg = params.contexts
    root = workspace_root()
    device, _ = resolve(cfg.device, None, "contexts")
    # SAE: live latents only (alive.json), encoded on the device
    features = open_source(source, root, live_only=True, device=device)
    renderer = TokenRenderer(load_tokenizer(root / BASE))
    selector = Selector(len(features.features), features.signs, cfg, device)
    ckpt = checkpoint_path(source)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    store = features.store
    exclusion = Exclusion.of(store, cfg.exclude, "contexts.exclude")
    with stage_run(
        "contexts", params, features.inputs, run_name=source, tags={"contexts.source": source}
    ) as tr:
        start_shard = _load_checkpoint(ckpt, tr.claim(ckpt, source=source), selector)
        started = time.perf_counter()
        _select(cfg, features, selector, exclusion, start_shard, ckpt, device, on_shard)
        elapsed = time.perf_counter() - started
        scanned = sum(s.tokens for s in store.shards[start_shard:])
        selector.to("cpu")
        excluded = _excluded(selector, store)
        table, stats = _write_tables(source, selector, features, renderer, excluded)
        metrics = _metrics(features, table, stats, excluded, start_shard)
        if scanned and elapsed > 0:
            metrics["activations_per_second"] = scanned * len(store.components) / elapsed
        mlflow.log_metrics(metrics)
        tr.log_outputs(*out_paths(source))
    resume.release(ckpt)
    return out_paths(source)[0]


def _write_parquet(path: Path, table: Any) -> None:
    import pyarrow.parquet as pq

    from lorascope.atomic import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _feature_name(features: FeatureSource, f: int, sign: int) -> str:
    name = features.features[f]
    return f"{name}{'+' if sign > 0 else '-'}" if features.signed else name


def contexts_table(selector: Selector, features: FeatureSource, renderer: Any) -> Any:
    """The selected windows as a pyarrow table (see the module docstring for the columns)."""
    import bisect

    cfg, st = selector.cfg, selector.state
    docs = features.store.documents
    doc_starts = [d[1] for d in docs]
    cols: dict[str, list[Any]] = {k: [] for k in CONTEXTS_SCHEMA.names}
    for group in GROUPS:
        score = st[f"{group}.score"]
        if score.shape[-1] == 0:
            continue
        score = score.numpy()
        pos, ids, acts = (st[f"{group}.{k}"].numpy() for k in ("pos", "ids", "acts"))
        for si, sign in enumerate(selector.signs):
            for f in range(selector.n_features):
                keep = [
                    j
                    for j in range(score.shape[-1])
                    if pos[si, f, j] >= 0 and (group != "top" or score[si, f, j] > cfg.active_threshold)
                ]
                if group == "quantile":  # equal-count activation bins over the uniform sample
                    keep.sort(key=lambda j: float(sign * acts[si, f, j, cfg.window_before]))
                for rank, j in enumerate(keep):
                    g = int(pos[si, f, j])
                    d = bisect.bisect_right(doc_starts, g) - 1
                    window = ids[si, f, j]
                    inside = (window != PAD_ID).nonzero()[0]
                    lo, hi = int(inside[0]), int(inside[-1]) + 1
                    window_ids = window[lo:hi].tolist()
                    text, pieces = renderer.render(window_ids)
                    position = g - docs[d][1]
                    cols["feature"].append(features.feature_id(f))
                    cols["feature_name"].append(_feature_name(features, f, sign))
                    cols["sign"].append(sign)
                    cols["kind"].append(group)
                    cols["rank"].append(rank)
                    cols["doc_id"].append(docs[d][0])
                    cols["doc_index"].append(d)
                    cols["position"].append(position)
                    cols["activation"].append(float(acts[si, f, j, cfg.window_before]))
                    cols["window_start"].append(position - (cfg.window_before - lo))
                    cols["window_ids"].append(window_ids)
                    cols["window_acts"].append(acts[si, f, j, lo:hi].tolist())
                    cols["quantile_bin"].append(
                        rank * cfg.quantile_bins // len(keep) if group == "quantile" else -1
                    )
                    cols["text"].append(text)
                    cols["tokens"].append(pieces)
    return pa.table(cols, schema=CONTEXTS_SCHEMA)


def features_table(selector: Selector, features: FeatureSource) -> Any:
    """Per feature sign: max, density, nonzero density, mean, std, min over the whole store."""
    st = selector.state
    tokens = max(int(st["tokens"]), 1)
    mean_F = st["sum"] / tokens
    std_F = kernels.sqrt((st["sumsq"] / tokens - mean_F.square()).clamp(min=0))
    rows: dict[str, list[Any]] = {k: [] for k in FEATURES_SCHEMA.names}
    for si, sign in enumerate(selector.signs):
        for f in range(selector.n_features):
            rows["feature"].append(features.feature_id(f))
            rows["feature_name"].append(_feature_name(features, f, sign))
            rows["sign"].append(sign)
            rows["max"].append(float(st["max"][f] if sign > 0 else -st["min"][f]))
            rows["density"].append(int(st["active"][si, f]) / tokens)
            rows["nonzero_density"].append(int(st["nonzero"][f]) / tokens)
            rows["mean"].append(float(mean_F[f]))
            rows["std"].append(float(std_F[f]))
            rows["min"].append(float(st["min"][f] if sign > 0 else -st["max"][f]))
            rows["tokens"].append(int(st["tokens"]))
    return pa.table(rows, schema=FEATURES_SCHEMA)
