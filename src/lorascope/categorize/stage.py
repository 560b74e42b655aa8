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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorascope import paths
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.project import workspace_root

if TYPE_CHECKING:
    from lorascope.categorize.assignment import Assignment
    from lorascope.categorize.inputs import Feature
    from lorascope.categorize.params import CategorizeSection
    from lorascope.categorize.subcategories import Subcategories
    from lorascope.extract.store import Store
    from lorascope.labelling.prompts import Category
    from lorascope.labelling.session import Answer
    from lorascope.llm.clients import CachedClient

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


@dataclass
class _Labelled:
    """What the stage categorizes, read and checked before any run opens: the label sources present,
    their ok features (SAE: live latents only), the LoRA and MLP explanation pools category generation
    samples, and the activation stores the Figure 2 densities sum."""

    sources: list[str]
    features: dict[str, list[Feature]]
    pools: dict[str, list[str]]
    stores: dict[str, Store]
    sae_dir: Path
    alive: list[int] | None
    """The SAE's live latents (``alive.json``); None when no SAE label set is present."""
    dead_labels: int
    """Ok labels of SAE latents that are not live (dropped, and counted)."""

    def inputs(self) -> list[Path]:
        """The run's DVC deps: label sets, contexts tables, activation stores and the SAE."""
        from lorascope.categorize.inputs import contexts_path, label_path

        inputs = [label_path(s) for s in self.sources] + [contexts_path(s) for s in self.sources]
        inputs += [store.root for store in self.stores.values()]
        if "sae" in self.sources:
            inputs.append(self.sae_dir)
        return inputs


@dataclass
class _Categorized:
    """What the LLM calls made: the shared categories (the generation's answer and the sample it was
    shown), each feature's category (``assigned``, in ``features`` order) and the SAE subcategories."""

    answer: Answer
    shown: list[str]
    shown_per_source: dict[str, int]
    categories: list[Category]
    features: list[Feature]
    assigned: list[Assignment]
    subs: Subcategories

    @property
    def ids(self) -> list[str]:
        return [c.string_id for c in self.categories]


def _open_stores(root: Path) -> dict[str, Store]:
    """The LoRA and MLP activation stores, each checked to hold its source (a swapped store would
    give Figure 2 the other source's densities)."""
    from lorascope.extract.store import Store

    stores = {}
    for source, rel in STORES.items():
        store = Store.open(root / rel, hint=f"run `lorascope extract --source {source}` first")
        if store.source != source:
            raise LorascopeError(
                f"{store.root}/index.json: holds source {store.source!r}, expected {source!r}"
            )
        stores[source] = store
    return stores


def _read_labelled(cfg: CategorizeSection, root: Path) -> _Labelled:
    """Every input of the stage, failing before any LLM call: no LoRA or MLP feature with status ok
    leaves nothing to generate shared categories from."""
    from lorascope.categorize.inputs import REQUIRED, label_path, load_features, ok_labels, present_sources
    from lorascope.sae.load import alive_latents, require

    sources = present_sources()
    sae_dir = root / paths.SAE
    alive: list[int] | None = None
    if "sae" in sources:  # the SAE's live latents: the only ones interpreted (and its decoder: Figure 2)
        require(sae_dir)
        alive = alive_latents(sae_dir)
    features = {s: load_features(s, cfg.n_examples, alive if s == "sae" else None) for s in sources}
    dead_labels = len(ok_labels("sae")) - len(features["sae"]) if "sae" in sources else 0
    stores = _open_stores(root)
    pools = {s: [f.explanation for f in features[s]] for s in REQUIRED}
    for s, pool in pools.items():
        if not pool:
            raise LorascopeError(
                f"{label_path(s)}: no feature has status ok; category generation needs an equal number of "
                f"{' and '.join(REQUIRED)} explanations"
            )
    return _Labelled(sources, features, pools, stores, sae_dir, alive, dead_labels)


def _run_tags(cfg: CategorizeSection, hashes: dict[str, str], sources: list[str]) -> dict[str, str]:
    """The run's tags: which backend and model made the categories and the assignments, with which
    prompts (their hashes), over which sources."""
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
    return tags


def _categorize(
    cfg: CategorizeSection, labelled: _Labelled, generator: CachedClient, assigner: CachedClient, run_id: str
) -> _Categorized:
    """B.2a shared categories, B.2b one category per feature, then the SAE subcategories; an unusable
    generation reply stops the stage (kept in ``run_id``'s artifacts)."""
    from lorascope.categorize.assignment import assign_all
    from lorascope.categorize.generation import generate, sample_equal
    from lorascope.categorize.subcategories import Subcategories, sae_subcategories

    # ---- B.2a: shared categories
    shown, shown_per_source = sample_equal(labelled.pools, cfg.sample_size, cfg.seed)
    got = asyncio.run(generate(generator, cfg.generate, shown, cfg.min_categories, cfg.max_categories))
    if got.error is not None:
        raise _generation_failed(got.raw, got.error, run_id)
    categories: list[Category] = got.value

    # ---- B.2b: one category per feature
    everyone = [f for s in labelled.sources for f in labelled.features[s]]
    assigned = asyncio.run(
        assign_all(assigner, cfg.assign, [(f, categories) for f in everyone], "categorize: assign")
    )

    # ---- SAE subcategories
    subs = Subcategories()
    if "sae" in labelled.sources and cfg.sae_subcategories:
        subs = asyncio.run(sae_subcategories(generator, assigner, cfg, categories, everyone, assigned))
    return _Categorized(got, shown, shown_per_source, categories, everyone, assigned, subs)


def _assignment_rows(made: _Categorized) -> list[dict[str, Any]]:
    """One ``assignments.parquet`` row per feature (``ASSIGNMENT_COLUMNS``)."""
    rows: list[dict[str, Any]] = []
    for f, a in zip(made.features, made.assigned, strict=True):
        sub = made.subs.assigned.get(f.feature_name) if f.source == "sae" else None
        rows.append({
            "source": f.source, "feature": f.feature, "feature_name": f.feature_name, "sign": f.sign,
            "category": a.category, "status": a.status, "error": a.error, "raw_response": a.raw_response,
            "subcategory": sub.category if sub else None, "subcategory_status": sub.status if sub else None,
            "subcategory_error": sub.error if sub else None,
            "subcategory_raw_response": sub.raw_response if sub else None,
        })  # fmt: skip
    return rows


def _sae_latents(labelled: _Labelled) -> dict[str, Any] | None:
    """``categories.json``'s ``sae_latents``: how many latents are live and how many labels were dropped."""
    if labelled.alive is None:
        return None
    return {
        "d_sae": figure_sae_width(labelled.sae_dir),
        "alive": len(labelled.alive),
        "dead_labels_dropped": labelled.dead_labels,
        "rule": "only live latents (models/sae/alive.json) are categorized; labels of others are dropped",
    }


def _categories_doc(
    cfg: CategorizeSection, labelled: _Labelled, made: _Categorized, hashes: dict[str, str]
) -> dict[str, Any]:
    """``categories.json``: the categories and how they were made (generation, assignment, SAE latents
    and subcategories)."""
    from lorascope.categorize.generation import category_dict
    from lorascope.categorize.inputs import REQUIRED
    from lorascope.categorize.subcategories import SUBCATEGORY_RULE, subcategory_range

    pools = labelled.pools
    return {
        "format": FORMAT,
        "categories": [
            {**category_dict(c), "sae_subcategories": made.subs.info.get(c.string_id)}
            for c in made.categories
        ],
        "generation": {
            "backend": cfg.generate.backend,
            "model": cfg.generate.model,
            "prompt_hash": hashes["categories"],
            "raw_response": made.answer.raw,
            "sources": list(REQUIRED),
            "explanations_available": sum(len(p) for p in pools.values()),
            "explanations_shown": len(made.shown),
            "explanations_available_per_source": {s: len(p) for s, p in pools.items()},
            "explanations_shown_per_source": made.shown_per_source,
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
            "sources": labelled.sources,
        },
        "sae_latents": _sae_latents(labelled),
        "sae_subcategories": {
            "enabled": cfg.sae_subcategories and "sae" in labelled.sources,
            "rule": SUBCATEGORY_RULE,
            "min_subcategories": subcategory_range(cfg)[0],
            "max_subcategories": subcategory_range(cfg)[1],
        },
    }


def _figures(
    params: Params, labelled: _Labelled, made: _Categorized, rows: list[dict[str, Any]], device: Any
) -> dict[str, dict[str, Any]]:
    """``figure1.json`` (category shares), ``figure2.json`` (the SAE latents' category-wise density:
    the paper's Figure 2) and ``figure2_lora.json`` (the LoRA directions' and MLP neurons')."""
    from lorascope.categorize.figures import DensitySample, figure1, figure2, figure2_sae
    from lorascope.exclusion import Exclusion

    cfg, ids = params.categorize, made.ids
    fig1 = figure1(rows, labelled.sources, made.categories, made.subs.sets)
    # Figure 2's tokens: a seeded document sample, less those the SAE never saw (its exclusion policy)
    samples = {
        source: DensitySample(
            store, cfg.density_tokens, cfg.seed, Exclusion.of(store, params.sae.exclude, "sae.exclude")
        )
        for source, store in labelled.stores.items()
    }
    fig2_lora = figure2(samples, rows, ids, cfg.density_tokens, device)
    if labelled.alive is not None:
        sae_members = [(r["feature"], r["category"], r["subcategory"])
                       for r in rows if r["source"] == "sae" and r["status"] == "ok"]  # fmt: skip
        sae_dir, alive = labelled.sae_dir, labelled.alive
        fig2 = figure2_sae(
            samples["lora"], sae_dir, alive, sae_members, ids, made.subs.sets, cfg.density_tokens, device
        )
    else:
        fig2 = {"features": "sae", "categories": ids, "missing": f"{paths.labels('sae').as_posix()} not found: "
                "no SAE latent is labelled (run `lorascope autointerp --source sae`)"}  # fmt: skip
    return {paths.FIGURE1.name: fig1, paths.FIGURE2.name: fig2, paths.FIGURE2_LORA.name: fig2_lora}


def _write_outputs(
    doc: dict[str, Any], rows: list[dict[str, Any]], figures: dict[str, dict[str, Any]]
) -> Path:
    """Write ``data/interp/categories/`` together (temp directory, then rename)."""
    import pyarrow.parquet as pq

    from lorascope.atomic import atomic_path, write_json

    out = out_dir()
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_json(tmp / paths.CATEGORY_SET.name, doc)
        pq.write_table(_assignments_table(rows), tmp / paths.ASSIGNMENTS.name)
        for name, figure in figures.items():
            write_json(tmp / name, figure)
    return out


def _cost_metrics(clients: tuple[CachedClient, ...]) -> dict[str, float]:
    """``cost_usd`` when every client that made requests is priced; otherwise none, and the run is
    tagged with why (genai-prices knows no price), rather than logging 0."""
    import mlflow

    costs = [c.cost_usd() if c.requests else 0.0 for c in clients]
    if None not in costs:
        return {"cost_usd": sum(c for c in costs if c is not None)}
    notes = {c.cost_note() for c in clients if c.requests and c.cost_usd() is None}
    mlflow.set_tag("categorize.cost_note", "; ".join(sorted(n for n in notes if n)))
    return {}


def _metrics(
    cfg: CategorizeSection,
    labelled: _Labelled,
    made: _Categorized,
    rows: list[dict[str, Any]],
    figure2_sae: dict[str, Any],
    clients: tuple[CachedClient, ...],
) -> dict[str, float]:
    """The run's metrics: LLM traffic (requests, cache hits, tokens, cost), outcomes per source, and
    the SAE's live latents and subcategories."""
    metrics: dict[str, float] = {
        "categories": len(made.categories),
        "requests": sum(c.requests for c in clients),
        "cache_hits": sum(c.hits for c in clients),
        "retries": sum(c.retries for c in clients),
        "input_tokens": sum(c.input_tokens for c in clients),
        "output_tokens": sum(c.output_tokens for c in clients),
        "uncategorized": sum(r["status"] == "uncategorized" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "truncated": sum(c.truncated for c in clients),  # replies cut at max_tokens (failures)
    }
    if labelled.alive is not None:
        metrics["sae_live_latents"] = len(labelled.alive)
        metrics["sae_dead_latents"] = figure2_sae["latents"]["dead"]
        metrics["sae_dead_labels_dropped"] = labelled.dead_labels
    for s in labelled.sources:
        for status, name in (("ok", "assigned"), ("uncategorized", "uncategorized"), ("failed", "failed")):
            metrics[f"{name}_{s}"] = sum(r["source"] == s and r["status"] == status for r in rows)
    if "sae" in labelled.sources and cfg.sae_subcategories:
        metrics["sae_subcategory_sets"] = len(made.subs.sets)
        metrics["sae_subcategorized"] = sum(r["subcategory"] is not None for r in rows)
    return metrics | _cost_metrics(clients)


def run(params: Params) -> Path:
    """Categorize every labelled feature; returns ``data/interp/categories/``."""
    import mlflow

    from lorascope.devices import resolve
    from lorascope.labelling.prompts import prompt_hash
    from lorascope.labelling.session import open_client
    from lorascope.tracking import stage_run

    cfg = params.categorize
    device, _ = resolve(cfg.device, None, "categorize")  # the density passes; bad values fail early
    labelled = _read_labelled(cfg, workspace_root())
    # a missing API key fails here, before any run is opened
    generator, assigner = open_client(cfg.generate), open_client(cfg.assign)
    hashes = {"categories": prompt_hash("categories"), "categorize": prompt_hash("categorize")}
    tags = _run_tags(cfg, hashes, labelled.sources)

    with stage_run("categorize", params, inputs=labelled.inputs(), tags=tags) as tr:
        made = _categorize(cfg, labelled, generator, assigner, tr.run_id)
        rows = _assignment_rows(made)
        doc = _categories_doc(cfg, labelled, made, hashes)
        figures = _figures(params, labelled, made, rows, device)
        out = _write_outputs(doc, rows, figures)
        tr.log_outputs(out)
        metrics = _metrics(cfg, labelled, made, rows, figures[paths.FIGURE2.name], (generator, assigner))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_artifacts(str(out), artifact_path="categories")
    return out
