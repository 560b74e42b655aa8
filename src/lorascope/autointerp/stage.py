"""Run the ``autointerp`` stage for one source: label every live feature from its contexts.

Per feature (LoRA: each sign of each direction; MLP: each sign of each neuron; SAE: each live latent, i.e.
listed in ``models/sae/alive.json`` (the contexts stage keeps no other) and fired) the
paper's B.1 prompt shows the top ``n_contexts`` windows with activations on its 0-10 scale; the JSON
reply gives the explanation, the class (0 monosemantic, 1 broad but consistent, 2 polysemantic) and
its reasoning. Detection scoring then checks the explanation: held-out activating windows (the
contexts stage's quantile samples whose token lies in no window the prompt showed and whose text is none
it showed: ``unseen_positives``) and as many random non-activating windows are shown in a seeded order,
the model says which match, and the balanced accuracy is recorded.

Requests run concurrently and go through the content-addressed LLM cache, so a killed or repeated
run asks only what it does not have. A reply that cannot be parsed is re-asked once, then recorded
as a failed label with its raw text. Writes ``data/interp/<source>.parquet``.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorascope import paths
from lorascope.components import parse_name
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.project import workspace_root

if TYPE_CHECKING:
    from lorascope.autointerp.params import AutointerpSection


def interp_path(source: str) -> Path:
    return workspace_root() / paths.labels(source)


def contexts_paths(source: str) -> tuple[Path, Path]:
    root = workspace_root()
    return root / paths.contexts(source), root / paths.features(source)


def layer_component(name: str) -> tuple[int | None, str | None]:
    """``L3.q_proj+`` -> (3, q_proj); ``L3.q_proj.0-`` -> (3, q_proj); ``L3.mlp.17`` -> (3, mlp);
    an SAE latent spans every layer -> (None, None)."""
    parsed = parse_name(name)
    return (parsed.layer, parsed.kind) if parsed else (None, None)


@dataclass
class Feature:
    """One feature as the prompts see it: sign-adjusted windows, its max, the detection windows."""

    id: int
    name: str
    sign: int
    max_act: float
    top: list[Any]
    positives: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    positives_left_out: int = 0
    """Quantile samples not scored: their token lies inside a window the labeller was shown, or their
    text is one it was shown (``unseen_positives``)."""


def _bounds(row: Any, before: int | None, after: int | None) -> tuple[int, int]:
    """``[lo, hi)``: the part of the row's stored window shown around its activating token."""
    at = int(row.position) - int(row.window_start)
    lo = 0 if before is None else max(0, at - before)
    hi = len(row.tokens) if after is None else min(len(row.tokens), at + after + 1)
    return lo, hi


def _window(row: Any, before: int | None, after: int | None) -> tuple[list[str], list[float]]:
    """The row's tokens and sign-adjusted activations, trimmed around its activating token."""
    lo, hi = _bounds(row, before, after)
    sign = int(row.sign)
    return list(row.tokens[lo:hi]), [sign * float(a) for a in row.window_acts[lo:hi]]


def _shown_range(row: Any, before: int | None, after: int | None) -> tuple[int, int, int]:
    """``(document, first, last + 1)``: the store positions of the window ``_window`` shows for ``row``."""
    lo, hi = _bounds(row, before, after)
    return int(row.doc_index), int(row.window_start) + lo, int(row.window_start) + hi


def unseen_positives(quantile: Any, top: Any, before: int | None, after: int | None) -> tuple[list[str], int]:
    """The detection positives the labeller never saw: quantile samples whose activating token is outside
    every shown top window (same document, shown range) and whose text is not a shown window's text (a
    repeated line elsewhere in the store is still what the labeller read). Returns the texts and how many
    samples were left out."""
    shown = [_shown_range(r, before, after) for r in top.itertuples()]
    seen_texts = {"".join(_window(r, before, after)[0]) for r in top.itertuples()}
    kept, left_out = [], 0
    for r in quantile.itertuples():
        doc, pos = int(r.doc_index), int(r.position)
        text = "".join(_window(r, before, after)[0])
        if text in seen_texts or any(d == doc and lo <= pos < hi for d, lo, hi in shown):
            left_out += 1
        else:
            kept.append(text)
    return kept, left_out


def load_features(params: Params, source: str) -> tuple[list[Feature], int]:
    """Live features of ``source`` in id order (and how many were dead: no activating context)."""
    import pandas as pd

    from lorascope.labelling.prompts import Example

    cfg = params.autointerp
    ctx_path, feat_path = contexts_paths(source)
    for p in (ctx_path, feat_path):
        if not p.is_file():
            raise LorascopeError(f"{p}: contexts not found; run `lorascope contexts --source {source}` first")
    ctx = pd.read_parquet(ctx_path)
    names = pd.read_parquet(feat_path, columns=["feature", "feature_name", "sign"]).sort_values("feature")
    groups = dict(tuple(ctx.groupby(["feature", "sign"])))  # a LoRA direction's two signs share its id
    features, dead = [], 0
    for fid, name, sign in names.itertuples(index=False):
        rows = groups.get((fid, sign))
        top = None if rows is None else rows[rows.kind == "top"].sort_values("rank").head(cfg.n_contexts)
        max_act = 0.0 if top is None or top.empty else float((top.activation * sign).max())
        if not max_act > 0:
            dead += 1
            continue
        assert rows is not None and top is not None  # max_act > 0: the feature has contexts
        examples = [Example(*_window(r, cfg.window_before, cfg.window_after)) for r in top.itertuples()]
        feature = Feature(int(fid), str(name), int(sign), max_act, examples)
        rng = random.Random(f"{cfg.seed}:{source}:{name}")
        positives, feature.positives_left_out = unseen_positives(
            rows[rows.kind == "quantile"], top, cfg.window_before, cfg.window_after
        )
        negatives = [
            "".join(_window(r, cfg.window_before, cfg.window_after)[0])
            for r in rows[rows.kind == "random"].itertuples()
        ]
        for pool, out in ((positives, feature.positives), (negatives, feature.negatives)):
            out.extend(rng.sample(pool, min(cfg.detection_samples, len(pool))))
        features.append(feature)
        if cfg.max_features and len(features) == cfg.max_features:
            break
    return features, dead


def latent_counts(features_path: Path) -> dict[str, float]:
    """``{"sae_latents", "sae_live_latents", "sae_dead_latents"}`` from an SAE features table's metadata
    (the contexts stage's count of the latents it kept and left out as dead); empty for other sources."""
    import json

    import pyarrow.parquet as pq

    from lorascope.contexts.tables import LATENTS_KEY

    raw = (pq.read_schema(features_path).metadata or {}).get(LATENTS_KEY)
    if raw is None:
        return {}
    counts = json.loads(raw)
    return {
        "sae_latents": counts["d_sae"],
        "sae_live_latents": counts["alive"],
        "sae_dead_latents": counts["dead"],
    }


def balanced_accuracy(said: list[bool], truth: list[bool]) -> float:
    """Mean of the hit rate on activating and the correct-rejection rate on non-activating windows."""
    pos = [s for s, t in zip(said, truth, strict=True) if t]
    neg = [not s for s, t in zip(said, truth, strict=True) if not t]
    rates = [sum(x) / len(x) for x in (pos, neg) if x]
    return sum(rates) / len(rates)


async def _label_all(
    params: Params, source: str, features: list[Feature], client: Any
) -> list[dict[str, Any]]:
    from lorascope.labelling.prompts import (
        DETECTION_SCHEMA,
        LABEL_SCHEMA,
        detection_prompt,
        explain_prompt,
        parse_detection,
        parse_label,
    )
    from lorascope.labelling.session import ask
    from lorascope.llm.clients import run_all

    cfg = params.autointerp

    async def label(f: Feature) -> dict[str, Any]:
        layer, component = layer_component(f.name)
        got = await ask(client, cfg, explain_prompt(f.top, f.max_act), parse_label, LABEL_SCHEMA)
        row: dict[str, Any] = {
            "source": source, "feature": f.id, "feature_name": f.name, "sign": f.sign, "layer": layer,
            "component": component, "explanation": None, "classification": None, "class_reasoning": None,
            "status": "failed", "error": got.error, "raw_response": got.raw, "cached": got.cached,
            "detection_balanced_accuracy": None, "detection_n": 0, "truncated": int(got.truncated),
        }  # fmt: skip
        tokens = [got.input_tokens, got.output_tokens]
        if got.error is None:
            row.update(
                explanation=got.value.explanation, classification=got.value.classification,
                class_reasoning=got.value.reasoning, status="ok",
            )  # fmt: skip
            snippets = [(s, True) for s in f.positives] + [(s, False) for s in f.negatives]
            if f.positives and f.negatives:
                random.Random(f"{cfg.seed}:order:{source}:{f.name}").shuffle(snippets)
                texts, truth = [s for s, _ in snippets], [t for _, t in snippets]
                det = await ask(
                    client, cfg, detection_prompt(got.value.explanation, texts),
                    partial(parse_detection, n=len(texts)), DETECTION_SCHEMA,
                )  # fmt: skip
                tokens = [tokens[0] + det.input_tokens, tokens[1] + det.output_tokens]
                row["cached"] = row["cached"] and det.cached
                row["truncated"] += int(det.truncated)
                if det.error is None:
                    row["detection_balanced_accuracy"] = balanced_accuracy(det.value, truth)
                    row["detection_n"] = len(texts)
                else:
                    row["error"] = f"detection: {det.error}"
        row["input_tokens"], row["output_tokens"] = tokens
        row["cost_usd"] = client.price(*tokens).usd
        return row

    results = await run_all(features, label, cfg.concurrency, f"autointerp {source}")
    return [r for r in results if not isinstance(r, Exception)] + [
        _crashed(source, f, r) for f, r in zip(features, results, strict=True) if isinstance(r, Exception)
    ]


def _crashed(source: str, f: Feature, err: Exception) -> dict[str, Any]:
    """A feature whose labelling raised: recorded as failed with the error, never dropped."""
    layer, component = layer_component(f.name)
    return {
        "source": source, "feature": f.id, "feature_name": f.name, "sign": f.sign, "layer": layer,
        "component": component, "explanation": None, "classification": None, "class_reasoning": None,
        "status": "failed", "error": f"{type(err).__name__}: {err}", "raw_response": "", "cached": False,
        "detection_balanced_accuracy": None, "detection_n": 0, "input_tokens": 0, "output_tokens": 0,
        "cost_usd": None,
    }  # fmt: skip


def _table(rows: list[dict[str, Any]], backend: str, model: str, prompt_hash: str) -> Any:
    import pyarrow as pa

    from lorascope.autointerp.labels import LABEL_COLUMNS

    rows = sorted(rows, key=lambda r: (r["feature"], -r["sign"]))
    for r in rows:
        r.update(backend=backend, model=model, prompt_hash=prompt_hash)
    types = {
        "feature": pa.int32(), "sign": pa.int8(), "layer": pa.int32(), "classification": pa.int8(),
        "input_tokens": pa.int64(), "output_tokens": pa.int64(), "cost_usd": pa.float64(), "cached": pa.bool_(),
        "detection_balanced_accuracy": pa.float64(), "detection_n": pa.int32(),
    }  # fmt: skip
    return pa.table({c: pa.array([r[c] for r in rows], types.get(c, pa.string())) for c in LABEL_COLUMNS})


def _run_tags(cfg: AutointerpSection, source: str, phash: str) -> dict[str, str]:
    """The run's tags: the source, which backend and model labelled it, with which prompts (hashes)."""
    from lorascope.labelling.prompts import prompt_hash

    tags = {
        "autointerp.source": source, "autointerp.backend": cfg.backend, "autointerp.model": cfg.model,
        "autointerp.prompt_hash": phash, "autointerp.detect_prompt_hash": prompt_hash("detect"),
    }  # fmt: skip
    if cfg.backend == "heuristic":
        tags["autointerp.note"] = "heuristic baseline: labels from token statistics, not an LLM"
    else:
        tags["autointerp.structured_output"] = str(cfg.structured_output).lower()
    return tags


def _quality_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per class (0 monosemantic, 1 broad, 2 polysemantic) its share of the labelled features and their
    mean detection score, and the mean detection score over every scored feature."""
    ok = [r for r in rows if r["status"] == "ok"]
    scored = [r for r in ok if r["detection_balanced_accuracy"] is not None]
    metrics: dict[str, float] = {}
    for c in (0, 1, 2):
        members = [r for r in ok if r["classification"] == c]
        metrics[f"class_{c}_share"] = len(members) / len(ok) if ok else 0.0
        accs = [
            r["detection_balanced_accuracy"] for r in members if r["detection_balanced_accuracy"] is not None
        ]
        if accs:
            metrics[f"detection_class_{c}"] = sum(accs) / len(accs)
    if scored:
        metrics["detection_balanced_accuracy"] = sum(r["detection_balanced_accuracy"] for r in scored) / len(
            scored
        )
    return metrics


def _metrics(
    rows: list[dict[str, Any]], features: list[Feature], dead: int, client: Any, feat_path: Path
) -> dict[str, float]:
    """The run's metrics: features labelled and failed, LLM traffic and its cost (unpriced: the run is
    tagged with why rather than logging 0), latent counts and the labels' quality."""
    import mlflow

    ok = [r for r in rows if r["status"] == "ok"]
    metrics: dict[str, float] = {
        "features": len(rows), "labelled": len(ok), "failed": len(rows) - len(ok), "dead_skipped": dead,
        "detection_positives_left_out": sum(f.positives_left_out for f in features),
        "requests": client.requests, "cache_hits": client.hits, "retries": client.retries,
        "input_tokens": client.input_tokens, "output_tokens": client.output_tokens,
        "label_set_input_tokens": sum(r["input_tokens"] for r in rows),
        "label_set_output_tokens": sum(r["output_tokens"] for r in rows),
    }  # fmt: skip
    cost = client.price(client.input_tokens, client.output_tokens)
    if cost.usd is not None:
        metrics["cost_usd"] = cost.usd
    else:  # unpriced (genai-prices): say why rather than log 0
        mlflow.set_tag("autointerp.cost_note", cost.reason)
    metrics["truncated"] = sum(r.get("truncated", 0) for r in rows)  # replies cut at max_tokens
    metrics.update(latent_counts(feat_path))
    return metrics | _quality_metrics(rows)


def run(params: Params, source: str) -> Path:
    """Label ``source``'s features; returns ``data/interp/<source>.parquet``."""
    import mlflow
    import pyarrow.parquet as pq

    from lorascope.atomic import atomic_path
    from lorascope.labelling.prompts import prompt_hash
    from lorascope.labelling.session import open_client
    from lorascope.tracking import stage_run

    cfg = params.autointerp
    features, dead = load_features(params, source)
    client = open_client(cfg)  # a missing API key fails here, before any run is opened
    ctx_path, feat_path = contexts_paths(source)
    phash = prompt_hash("explain")
    tags = _run_tags(cfg, source, phash)
    with stage_run("autointerp", params, inputs=[ctx_path, feat_path], run_name=source, tags=tags) as sr:
        mlflow.set_tag("contexts.digest", sr.inputs_md5[ctx_path])
        rows = asyncio.run(_label_all(params, source, features, client))
        table = _table(rows, cfg.backend, cfg.model, phash)
        out = interp_path(source)
        with atomic_path(out, ".parquet") as tmp:
            pq.write_table(table, tmp)
        sr.log_outputs(out)
        mlflow.log_metrics(_metrics(rows, features, dead, client, feat_path))
        mlflow.log_artifact(str(out))
    return out
