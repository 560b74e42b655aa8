"""Run the ``categorize`` stage: shared categories, one category per labelled feature, Figure 1/2 data.

1. Category generation (B.2a, ``categorize.generate``): an equal number of LoRA and MLP explanations
   (``sample_size`` in all, seeded; the paper prompts with equal numbers of both), mixed in one seeded
   order, so both sources share one set of categories. A reply that is still unusable after one re-ask
   stops the stage (its raw text is kept in ``checkpoints/categorize/generation-reply.txt`` and the run).
2. Assignment (B.2b, ``categorize.assign``): every ok feature of every source present (``sae`` when its label
   set exists) gets one category; an unknown id is re-asked once, then recorded as ``uncategorized``.
3. SAE subcategories (``categorize.sae_subcategories``): see ``subcategories.SUBCATEGORY_RULE``.
4. Figure data: category shares per source (Figure 1); the paper's Figure 2, the category-wise activation
   density of the SAE latents (overall, by subcategory, and by layer and component type through each
   latent's decoder row: ``figures.FIGURE2_SAE_ATTRIBUTION``) over the first ``density_tokens`` tokens of
   the LoRA store; and the same density of the LoRA directions and MLP neurons themselves.

SAE latents count only when live (``models/sae/alive.json``): a label of a dead latent (a label set older
than the SAE) is dropped and counted (``categories.json`` ``sae_latents``, metric ``sae_dead_labels_dropped``).

Every request goes through the LLM cache, so a killed run resumes for free and a repeated one makes no
requests and writes the same files. Outputs, written together (temp directory, then rename), in
``data/interp/categories/``:

* ``categories.json``: the categories (``string_id``, ``name``, ``definition``, ``examples``, ``sae_subcategories``)
  and how they were made (backend, model, prompt hashes, the raw generation reply, the sample);
* ``assignments.parquet``: one row per ok feature (see ``ASSIGNMENT_COLUMNS``);
* ``figure1.json``, ``figure2.json`` (SAE latents: the paper's Figure 2), ``figure2_lora.json`` (LoRA
  directions and MLP neurons) (see ``figures``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from lorascope import paths
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.project import workspace_root

OUT = paths.CATEGORIES
STORES = {"lora": paths.activations("lora"), "mlp": paths.activations("mlp")}
GENERATION_REPLY = paths.checkpoints("categorize") / "generation-reply.txt"
FORMAT = "lorascope-categories/1"
ASSIGNMENT_COLUMNS = (
    "source", "feature", "feature_name", "sign", "category", "status", "error", "raw_response",
    "subcategory", "subcategory_status", "subcategory_error", "subcategory_raw_response",
)  # fmt: skip
"""``assignments.parquet``: ``status`` ok | uncategorized | failed (category null unless ok);
``subcategory_status`` null when the feature's category has no SAE subcategories (every non-SAE feature)."""


def figure_sae_width(sae_dir: Path) -> int:
    """``d_sae`` of the SAE in ``sae_dir`` (its cfg)."""
    from lorascope.sae.load import read_cfg

    return int(read_cfg(sae_dir)["d_sae"])


def out_dir() -> Path:
    return workspace_root() / OUT


def _assignments_table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    types = {"feature": pa.int32(), "sign": pa.int8()}
    return pa.table(
        {c: pa.array([r[c] for r in rows], types.get(c, pa.string())) for c in ASSIGNMENT_COLUMNS}
    )


def _generation_failed(raw: str, error: str, run_id: str) -> LorascopeError:
    """Keep the unusable reply (file and run artifact) and word the fatal error."""
    import mlflow

    from lorascope.atomic import write_text

    path = workspace_root() / GENERATION_REPLY
    write_text(path, raw)
    mlflow.log_text(raw, GENERATION_REPLY.name)
    return LorascopeError(
        f"category generation failed: {error}; the raw reply is in {path} (and artifact "
        f"{GENERATION_REPLY.name} of MLflow run {run_id})"
    )


def run(params: Params) -> Path:
    """Categorize every labelled feature; returns ``data/interp/categories/``."""
    import mlflow
    import pyarrow.parquet as pq

    from lorascope.atomic import atomic_path, write_json
    from lorascope.categorize.assignment import assign_all
    from lorascope.categorize.figures import DensitySample, figure1, figure2, figure2_sae
    from lorascope.categorize.generation import category_dict, generate, sample_equal
    from lorascope.categorize.inputs import (
        REQUIRED,
        contexts_path,
        label_path,
        load_features,
        ok_labels,
        present_sources,
    )
    from lorascope.categorize.subcategories import (
        SUBCATEGORY_RULE,
        Subcategories,
        sae_subcategories,
        subcategory_range,
    )
    from lorascope.devices import resolve
    from lorascope.exclusion import Exclusion
    from lorascope.extract.store import Store
    from lorascope.labelling.prompts import Category, prompt_hash
    from lorascope.labelling.session import open_client
    from lorascope.sae.load import alive_latents, require
    from lorascope.tracking import stage_run

    cfg = params.categorize
    device, _ = resolve(cfg.device, None, "categorize")  # the density passes; bad values fail early
    root = workspace_root()
    sources = present_sources()
    sae_dir = root / paths.SAE
    alive: list[int] | None = None
    if "sae" in sources:  # the SAE's live latents: the only ones interpreted (and its decoder: Figure 2)
        require(sae_dir)
        alive = alive_latents(sae_dir)
    features = {s: load_features(s, cfg.n_examples, alive if s == "sae" else None) for s in sources}
    dead_labels = len(ok_labels("sae")) - len(features["sae"]) if "sae" in sources else 0
    stores = {}
    for source, rel in STORES.items():
        store = Store.open(root / rel, hint=f"run `lorascope extract --source {source}` first")
        if store.source != source:
            raise LorascopeError(
                f"{store.root}/index.json: holds source {store.source!r}, expected {source!r}"
            )
        stores[source] = store
    pools = {s: [f.explanation for f in features[s]] for s in REQUIRED}
    for s, pool in pools.items():
        if not pool:
            raise LorascopeError(
                f"{label_path(s)}: no feature has status ok; category generation needs an equal number of "
                f"{' and '.join(REQUIRED)} explanations"
            )
    # a missing API key fails here, before any run is opened
    generator, assigner = open_client(cfg.generate), open_client(cfg.assign)
    hashes = {"categories": prompt_hash("categories"), "categorize": prompt_hash("categorize")}
    tags = {
        "categorize.generate.backend": cfg.generate.backend,
        "categorize.generate.model": cfg.generate.model,
        "categorize.assign.backend": cfg.assign.backend,
        "categorize.assign.model": cfg.assign.model,
        "categorize.prompt_hash.categories": hashes["categories"],
        "categorize.prompt_hash.categorize": hashes["categorize"],
        "categorize.sources": ",".join(sources),
    }
    if "heuristic" in (cfg.generate.backend, cfg.assign.backend):
        tags["categorize.note"] = "heuristic baseline: categories from token classes, not an LLM"
    for role, section in (("generate", cfg.generate), ("assign", cfg.assign)):
        if section.backend != "heuristic":
            tags[f"categorize.{role}.structured_output"] = str(section.structured_output).lower()
    inputs = [label_path(s) for s in sources] + [contexts_path(s) for s in sources]
    inputs += [store.root for store in stores.values()]
    if "sae" in sources:
        inputs.append(sae_dir)

    with stage_run("categorize", params, inputs=inputs, tags=tags) as tr:
        # ---- B.2a: shared categories
        shown, shown_per_source = sample_equal(pools, cfg.sample_size, cfg.seed)
        got = asyncio.run(generate(generator, cfg.generate, shown, cfg.min_categories, cfg.max_categories))
        if got.error is not None:
            raise _generation_failed(got.raw, got.error, tr.run_id)
        categories: list[Category] = got.value
        ids = [c.string_id for c in categories]

        # ---- B.2b: one category per feature
        everyone = [f for s in sources for f in features[s]]
        assigned = asyncio.run(
            assign_all(assigner, cfg.assign, [(f, categories) for f in everyone], "categorize: assign")
        )

        # ---- SAE subcategories
        subs = Subcategories()
        if "sae" in sources and cfg.sae_subcategories:
            subs = asyncio.run(sae_subcategories(generator, assigner, cfg, categories, everyone, assigned))

        # ---- outputs
        rows: list[dict[str, Any]] = []
        for f, a in zip(everyone, assigned, strict=True):
            sub = subs.assigned.get(f.feature_name) if f.source == "sae" else None
            rows.append({
                "source": f.source, "feature": f.feature, "feature_name": f.feature_name, "sign": f.sign,
                "category": a.category, "status": a.status, "error": a.error, "raw_response": a.raw_response,
                "subcategory": sub.category if sub else None, "subcategory_status": sub.status if sub else None,
                "subcategory_error": sub.error if sub else None,
                "subcategory_raw_response": sub.raw_response if sub else None,
            })  # fmt: skip
        sae_latents = None
        if alive is not None:
            sae_latents = {
                "d_sae": figure_sae_width(sae_dir),
                "alive": len(alive),
                "dead_labels_dropped": dead_labels,
                "rule": "only live latents (models/sae/alive.json) are categorized; labels of others are dropped",
            }
        doc = {
            "format": FORMAT,
            "categories": [
                {**category_dict(c), "sae_subcategories": subs.info.get(c.string_id)} for c in categories
            ],
            "generation": {
                "backend": cfg.generate.backend,
                "model": cfg.generate.model,
                "prompt_hash": hashes["categories"],
                "raw_response": got.raw,
                "sources": list(REQUIRED),
                "explanations_available": sum(len(p) for p in pools.values()),
                "explanations_shown": len(shown),
                "explanations_available_per_source": {s: len(p) for s, p in pools.items()},
                "explanations_shown_per_source": shown_per_source,
                "sampling": "an equal number from each source (sample_size // 2, at most the smaller pool), "
                "drawn without replacement with `seed`, then mixed in one seeded order",
                "seed": cfg.seed,
                "min_categories": cfg.min_categories,
                "max_categories": cfg.max_categories,
            },
            "assignment": {
                "backend": cfg.assign.backend,
                "model": cfg.assign.model,
                "prompt_hash": hashes["categorize"],
                "n_examples": cfg.n_examples,
                "sources": sources,
            },
            "sae_latents": sae_latents,
            "sae_subcategories": {
                "enabled": cfg.sae_subcategories and "sae" in sources,
                "rule": SUBCATEGORY_RULE,
                "min_subcategories": subcategory_range(cfg)[0],
                "max_subcategories": subcategory_range(cfg)[1],
            },
        }
        fig1 = figure1(rows, sources, categories, subs.sets)
        # Figure 2's tokens: a seeded document sample, less those the SAE never saw (its exclusion policy)
        samples = {
            source: DensitySample(
                store, cfg.density_tokens, cfg.seed, Exclusion.of(store, params.sae.exclude, "sae.exclude")
            )
            for source, store in stores.items()
        }
        fig2_lora = figure2(samples, rows, ids, cfg.density_tokens, device)
        if alive is not None:
            sae_members = [(r["feature"], r["category"], r["subcategory"])
                           for r in rows if r["source"] == "sae" and r["status"] == "ok"]  # fmt: skip
            fig2 = figure2_sae(
                samples["lora"], sae_dir, alive, sae_members, ids, subs.sets, cfg.density_tokens, device
            )
        else:
            fig2 = {"features": "sae", "categories": ids, "missing": f"{paths.labels('sae').as_posix()} not found: "
                    "no SAE latent is labelled (run `lorascope autointerp --source sae`)"}  # fmt: skip
        out = out_dir()
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            write_json(tmp / "categories.json", doc)
            pq.write_table(_assignments_table(rows), tmp / "assignments.parquet")
            write_json(tmp / "figure1.json", fig1)
            write_json(tmp / "figure2.json", fig2)
            write_json(tmp / "figure2_lora.json", fig2_lora)
        tr.log_outputs(out)

        clients = (generator, assigner)
        metrics: dict[str, float] = {
            "categories": len(categories),
            "requests": sum(c.requests for c in clients),
            "cache_hits": sum(c.hits for c in clients),
            "retries": sum(c.retries for c in clients),
            "input_tokens": sum(c.input_tokens for c in clients),
            "output_tokens": sum(c.output_tokens for c in clients),
            "uncategorized": sum(r["status"] == "uncategorized" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows),
            "truncated": sum(c.truncated for c in clients),  # replies cut at max_tokens (failures)
        }
        if alive is not None:
            metrics["sae_live_latents"] = len(alive)
            metrics["sae_dead_latents"] = fig2["latents"]["dead"]
            metrics["sae_dead_labels_dropped"] = dead_labels
        for s in sources:
            for status, name in (
                ("ok", "assigned"),
                ("uncategorized", "uncategorized"),
                ("failed", "failed"),
            ):
                metrics[f"{name}_{s}"] = sum(r["source"] == s and r["status"] == status for r in rows)
        if "sae" in sources and cfg.sae_subcategories:
            metrics["sae_subcategory_sets"] = len(subs.sets)
            metrics["sae_subcategorized"] = sum(r["subcategory"] is not None for r in rows)
        costs = [c.cost_usd() if c.requests else 0.0 for c in clients]
        if None not in costs:
            metrics["cost_usd"] = sum(c for c in costs if c is not None)  # every client is priced
        else:  # unpriced (genai-prices): say why rather than log 0
            notes = {c.cost_note() for c in clients if c.requests and c.cost_usd() is None}
            mlflow.set_tag("categorize.cost_note", "; ".join(sorted(n for n in notes if n)))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_artifacts(str(out), artifact_path="categories")
    return out
