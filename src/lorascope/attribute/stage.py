"""Run the ``attribute`` stage: which units the adapter's gain depends on.

1. **Screen** every unit (``measure.screen``: attribution patching of ΔCE on the response tokens of
   ``attribute.sequences`` training sequences, one forward and one backward per sequence for all units).
2. **Exact**: the top ``attribute.exact`` units by screened ΔCE, as many drawn at random from the rest (the
   control), every component when there are at most ``exact`` of them, and the ``named`` units are ablated
   exactly (ΔCE and KL(P_lora || P_ablated) per response token); the Spearman rank correlation of screened
   and exact ΔCE over the components and over every exactly measured unit says how far the screen can be
   trusted.
3. **Accuracy**: the top ``attribute.generate`` units and the ``named`` ones are ablated while the benchmark
   questions are generated (``accuracy``): Δaccuracy with a paired bootstrap 95% CI, Δbacktracking.

Outputs in ``metrics/attribute/``: ``screen.json`` (every unit, ranked), ``exact.json``, ``accuracy.json``;
all per response token (nats) where they are cross-entropies. The stage run (MLflow ``lorascope-attribute``)
logs the rank correlations and the top units; each generated ablation is a child run. Each sequence's sums
and each unit's answers go to ``checkpoints/attribute/`` when done, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorascope import paths, resume
from lorascope.atomic import write_json
from lorascope.attribute.units import Unit
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.project import workspace_root

SCREEN_DEFINITION = (
    "first-order change in the response tokens' cross-entropy when the unit is ablated (attribution "
    "patching: gradient x the ablation's change of the adapter state), nats per response token"
)
EXACT_DEFINITIONS = {
    "delta_ce": "CE(P_ablated) - CE(P_lora) on the response tokens, nats per token",
    "kl": "KL(P_lora || P_ablated) per response token",
}
CHECKPOINT_VERSION = "v1"


def _cached(path: Path, compute: Callable[[], Any]) -> Any:
    """``compute()``'s JSON, saved at ``path`` the first time (a resumed run reads it back)."""
    if not path.is_file():
        write_json(path, compute())
    return json.loads(path.read_text())


def _per_token(sums: Sequence[dict[str, Any]], key: str, names: Sequence[str]) -> dict[str, float]:
    tokens = sum(s["tokens"] for s in sums)
    return {n: sum(s[key][n] for s in sums) / tokens for n in names}


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (None for fewer than 3 pairs or a constant side)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def exact_set(
    ranked: Sequence[Unit], named: Sequence[Unit], exact: int, seed: int, components: bool
) -> dict[str, list[str]]:
    """Which units are measured exactly, and why: ``top``, ``control`` (seeded, from the rest),
    ``components`` (all of them, with ``components``) and ``named``."""
    top = list(ranked[:exact])
    rest = [u for u in ranked if u not in top]
    control = random.Random(seed).sample(rest, min(exact, len(rest)))
    comps = [u for u in ranked if u.kind == "component"]
    sets = {
        "top": [u.name for u in top],
        "control": [u.name for u in control],
        "components": [u.name for u in comps] if components else [],
        "named": [u.name for u in named],
    }
    return sets


def labels(root: Path) -> dict[str, str]:
    """Each unit's ok labels (``data/interp``), for the tables: a latent's explanation, a component's
    explanation per sign."""
    import pyarrow.parquet as pq

    out: dict[str, list[str]] = {}
    for source in ("lora", "sae"):
        p = root / paths.labels(source)
        if not p.is_file():
            continue
        for r in pq.read_table(p, columns=["feature_name", "explanation", "status"]).to_pylist():
            if r["status"] == "ok" and r["explanation"]:
                name = r["feature_name"]
                unit = name.rstrip("+-")
                out.setdefault(unit, []).append(
                    f"{name[len(unit) :]}{' ' if name != unit else ''}{r['explanation']}"
                )
    return {k: "; ".join(v) for k, v in out.items()}


class Context:
    """What every step reads: the model with its hooks, the SAE, the units, the sequences and questions."""

    def __init__(self, params: Params) -> None:
        from lorascope.attribute.units import component_units, latent_units
        from lorascope.components import lora_components
        from lorascope.interventions import State
        from lorascope.models import load_lora_model, load_tokenizer
        from lorascope.prepare import table

        self.params, self.cfg, self.root = params, params.attribute, workspace_root()
        cfg, root = self.cfg, self.root
        self.model = load_lora_model(
            root / paths.BASE, root / paths.LORA, cfg.precision, cfg.device, "attribute"
        )
        self.model.requires_grad_(False)  # the screen's gradient is taken for the adapter state only
        self.tokenizer = load_tokenizer(root / paths.BASE)
        self.comps = lora_components(self.model)
        self.state = State(self.model, self.comps)
        self.sae: Any = None
        alive: list[int] = []
        if "latents" in cfg.units:
            self.sae, alive = self._sae()
        self.units = (component_units(self.comps) if "components" in cfg.units else []) + latent_units(alive)
        self.named, self.unmatched = self._named()
        for key, n in (("exact", cfg.exact), ("generate", cfg.generate)):
            if n > len(self.units):
                raise LorascopeError(
                    f"attribute.{key}: {n} is more than the {len(self.units)} units screened"
                )
        self.sequences = table.sample(root / paths.PREPARED, cfg.sequences, cfg.max_tokens, cfg.seed,
                                      "attribute.max_tokens")  # fmt: skip
        self.inputs = [root / paths.PREPARED, root / paths.BASE, root / paths.LORA]
        if self.sae is not None:
            self.inputs.append(root / paths.SAE)
        if any(n.startswith("label:") for n in cfg.named):
            self.inputs += [
                root / paths.labels(s) for s in ("lora", "sae") if (root / paths.labels(s)).is_file()
            ]

    def _named(self) -> tuple[list[Unit], dict[str, str]]:
        """The named units; a ``label:`` selector no label matches is a finding (recorded), not an error."""
        from lorascope.attribute.units import resolve
        from lorascope.autointerp.labels import NoLabelMatch

        named, unmatched = [], {}
        for name in self.cfg.named:
            try:
                named.append(resolve(name, self.units, self.root))
            except NoLabelMatch as err:
                unmatched[name] = err.finding
        return list(dict.fromkeys(named)), unmatched

    def _sae(self) -> tuple[Any, list[int]]:
        from lorascope.components import feature_names
        from lorascope.sae.load import alive_latents, load_sae, require

        sae_dir = self.root / paths.SAE
        require(sae_dir)
        device = next(self.model.parameters()).device
        sae, cfg = load_sae(sae_dir, device)
        if list(cfg["components"]) != feature_names(self.comps):
            raise LorascopeError(
                f"{sae_dir}: the SAE was trained on other adapter components than models/lora has"
            )
        sae.requires_grad_(False)
        return sae, alive_latents(sae_dir, sae.d_sae)

    def ids(self, i: int) -> tuple[Any, int]:
        import torch

        _, ids, first = self.sequences[i]
        return torch.tensor([ids], device=next(self.model.parameters()).device), first


def screen_units(ctx: Context, work: Path) -> tuple[list[Unit], dict[str, float], float]:
    """Every unit ranked by screened ΔCE (largest first), the per-token values, and CE of the adapter."""
    from lorascope.attribute.measure import screen
    from lorascope.progress import track

    names, cfg = [u.name for u in ctx.units], ctx.cfg
    sums = []
    with ctx.state.attach():
        for i in track(range(len(ctx.sequences)), "attribute: screen", total=len(ctx.sequences)):
            ids, first = ctx.ids(i)

            def one(ids: Any = ids, first: int = first) -> dict[str, Any]:
                ce, values = screen(
                    ctx.state,
                    ctx.model,
                    ctx.sae,
                    ctx.units,
                    ids,
                    first,
                    cfg.screen_groups,
                    cfg.screen_steps,
                    cfg.seed,
                )
                return {
                    "tokens": ids.shape[1] - first,
                    "ce": ce,
                    "screened": dict(zip(names, values, strict=True)),
                }

            sums.append(_cached(work / f"screen-{i:05d}.{CHECKPOINT_VERSION}.json", one))
    screened = _per_token(sums, "screened", names)
    ce = sum(s["ce"] for s in sums) / sum(s["tokens"] for s in sums)
    ranked = sorted(ctx.units, key=lambda u: (-screened[u.name], names.index(u.name)))
    return ranked, screened, ce


def measure_exact(ctx: Context, work: Path, units: Sequence[Unit]) -> dict[str, dict[str, float]]:
    """Per-token exact ΔCE and KL of each of ``units``."""
    from lorascope.attribute.measure import exact
    from lorascope.progress import track

    names = [u.name for u in units]
    sums = []
    with ctx.state.attach():
        for i in track(range(len(ctx.sequences)), "attribute: exact", total=len(ctx.sequences)):
            ids, first = ctx.ids(i)

            def one(ids: Any = ids, first: int = first) -> dict[str, Any]:
                dce, kl = exact(ctx.state, ctx.model, ctx.sae, units, ids, first, ctx.cfg.batch_size)
                return {"tokens": ids.shape[1] - first, "delta_ce": dce, "kl": kl}

            sums.append(_cached(work / f"exact-{i:05d}.{CHECKPOINT_VERSION}.json", one))
    return {"delta_ce": _per_token(sums, "delta_ce", names), "kl": _per_token(sums, "kl", names)}


def generate_answers(
    ctx: Context, work: Path, units: Sequence[Unit | None]
) -> dict[str, list[dict[str, Any]]]:
    """Each question's answer with each of ``units`` ablated (None: the adapter as trained)."""
    from contextlib import nullcontext

    from lorascope.attribute.accuracy import answer_rows
    from lorascope.attribute.hooks import ablated_generation
    from lorascope.chat import chat_prompt
    from lorascope.evaluate.benchmarks import question_rows
    from lorascope.generation import generate
    from lorascope.progress import track

    cfg, ev = ctx.cfg, ctx.params.evaluate
    rows = question_rows(cfg.tasks, cfg.limit, ev.data, ev.choice_seed, ctx.root, "attribute.tasks")
    prompts = [chat_prompt(ctx.tokenizer, r["prompt"]) for r in rows]
    out = {}
    for unit in track(units, "attribute: generate", total=len(units)):
        name = unit.name if unit is not None else "lora"

        def one(unit: Unit | None = unit) -> list[dict[str, Any]]:
            ablating = ablated_generation(ctx.model, ctx.comps, unit, ctx.sae) if unit else nullcontext()
            with ablating:
                outs = generate(
                    ctx.model, ctx.tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, cfg.answer_tokens
                )
            return answer_rows(rows, outs, cfg.backtrack_words)

        out[name] = _cached(work / f"generate-{name}.{CHECKPOINT_VERSION}.json", one)
    return out


def exact_table(
    ranked: Sequence[Unit], screened: dict[str, float], exact: dict[str, dict[str, float]],
    sets: dict[str, list[str]], names: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    """``exact.json``: each measured unit (screen rank, screened and exact values, why it was measured)
    and the rank correlations."""
    rank = {u.name: i + 1 for i, u in enumerate(ranked)}
    kind = {u.name: u.kind for u in ranked}
    measured = [u.name for u in ranked if u.name in exact["delta_ce"]]
    comps = [n for n in measured if kind[n] == "component"]
    table = [
        {"unit": n, "kind": kind[n], "rank": rank[n], "screened_delta_ce": screened[n],
         "delta_ce": exact["delta_ce"][n], "kl": exact["kl"][n],
         "sets": [k for k, v in sets.items() if n in v], "label": names.get(n)}
        for n in measured
    ]  # fmt: skip

    def mean(group: str) -> float | None:
        values = [exact["delta_ce"][n] for n in sets[group]]
        return sum(values) / len(values) if values else None

    return {
        "definitions": EXACT_DEFINITIONS,
        "screened_definition": SCREEN_DEFINITION,
        "spearman_components": spearman([screened[n] for n in comps], [exact["delta_ce"][n] for n in comps]),
        "spearman_components_kl": spearman([screened[n] for n in comps], [exact["kl"][n] for n in comps]),
        "spearman_measured": spearman(
            [screened[n] for n in measured], [exact["delta_ce"][n] for n in measured]
        ),
        "components_measured": len(comps),
        "mean_delta_ce": {g: mean(g) for g in ("top", "control")},
        "units": table,
    }


def accuracy_table(
    answers: dict[str, list[dict[str, Any]]],
    chosen: dict[str, list[str]],
    names: dict[str, str],
    params: Params,
) -> dict[str, Any]:
    """``accuracy.json``: the adapter as trained, then each generated unit's effects."""
    from lorascope.attribute.accuracy import effect, per_1k

    cfg, lora = params.attribute, answers["lora"]
    units = {
        n: {**effect(lora, answers[n], cfg.bootstrap_iters, cfg.seed, n),
            "sets": [k for k, v in chosen.items() if n in v], "label": names.get(n)}
        for n in answers if n != "lora"
    }  # fmt: skip
    return {
        "questions": len(lora),
        "tasks": cfg.tasks,
        "lora": {"accuracy": sum(r["correct"] for r in lora) / len(lora), "backtracks_per_1k": per_1k(lora)},
        "units": units,
    }


def run(params: Params) -> Path:
    """Screen, measure and generate (module docstring); returns ``metrics/attribute/``."""
    import mlflow

    from lorascope.tracking import experiment_id, stage_run

    ctx = Context(params)
    cfg, root = ctx.cfg, ctx.root
    with stage_run("attribute", params, ctx.inputs) as sr:
        work = root / paths.checkpoints("attribute")
        sr.claim(work)
        work.mkdir(parents=True, exist_ok=True)
        ranked, screened, ce = screen_units(ctx, work)
        sets = exact_set(ranked, ctx.named, cfg.exact, cfg.seed, cfg.exact_components)
        wanted = {n for v in sets.values() for n in v}
        exact = measure_exact(ctx, work, [u for u in ranked if u.name in wanted])
        gen = {"top": [u.name for u in ranked[: cfg.generate]], "named": [u.name for u in ctx.named]}
        generated = [u for u in ranked if u.name in {n for v in gen.values() for n in v}]
        answers = generate_answers(ctx, work, [None, *generated]) if generated else {}
        names = labels(root)
        out = root / paths.ATTRIBUTE
        screen_doc = {
            "definition": SCREEN_DEFINITION, "sequences": len(ctx.sequences), "ce_lora": ce,
            "units": [{"unit": u.name, "kind": u.kind, "rank": i + 1, "screened_delta_ce": screened[u.name],
                       "label": names.get(u.name)} for i, u in enumerate(ranked)],
        }  # fmt: skip
        exact_doc = exact_table(ranked, screened, exact, sets, names)
        accuracy_doc = accuracy_table(answers, gen, names, params) if answers else {"units": {}}
        accuracy_doc["unmatched"] = ctx.unmatched
        write_json(root / paths.ATTRIBUTE_SCREEN, screen_doc)
        write_json(root / paths.ATTRIBUTE_EXACT, exact_doc)
        write_json(root / paths.ATTRIBUTE_ACCURACY, accuracy_doc)
        _log(sr, exact_doc, accuracy_doc, experiment_id("attribute"))
        sr.log_outputs(
            root / paths.ATTRIBUTE_SCREEN, root / paths.ATTRIBUTE_EXACT, root / paths.ATTRIBUTE_ACCURACY
        )
        for f in (paths.ATTRIBUTE_SCREEN, paths.ATTRIBUTE_EXACT, paths.ATTRIBUTE_ACCURACY):
            mlflow.log_artifact(str(root / f), "attribute")
    resume.release(work)
    return out


def _log(sr: Any, exact_doc: dict[str, Any], accuracy_doc: dict[str, Any], exp_id: str) -> None:
    """The stage run's metrics and one child run per generated ablation."""
    import mlflow

    metrics = {
        k: exact_doc[k] for k in ("spearman_components", "spearman_measured") if exact_doc[k] is not None
    }
    metrics |= {f"mean_delta_ce.{g}": v for g, v in exact_doc["mean_delta_ce"].items() if v is not None}
    if "lora" in accuracy_doc:
        metrics |= {f"lora.{k}": v for k, v in accuracy_doc["lora"].items()}
    mlflow.log_metrics(metrics)
    for name, e in accuracy_doc["units"].items():
        with mlflow.start_run(experiment_id=exp_id, run_name=name, nested=True,
                              tags={"lorascope.stage": "attribute", "attribute.unit": name, "upstream.attribute": sr.run_id}):  # fmt: skip
            mlflow.log_params({"unit": name, "sets": ",".join(e["sets"]), "label": (e["label"] or "")[:500]})
            ci = e["delta_accuracy_ci"] or [None, None]
            values = {"accuracy": e["accuracy"], "delta_accuracy": e["delta_accuracy"],
                      "delta_accuracy_ci_low": ci[0], "delta_accuracy_ci_high": ci[1],
                      "backtracks_per_1k": e["backtracks_per_1k"], "delta_backtracks_per_1k": e["delta_backtracks_per_1k"]}  # fmt: skip
            mlflow.log_metrics({k: float(v) for k, v in values.items() if v is not None})
