"""What a user sees first of each stage's MLflow experiment: its kind, its description and a saved view
of the key metrics as columns of the runs table.

MLflow 3.17 opens an experiment on its GenAI overview (an empty traces dashboard) unless the URL asks for
the model-training workflow (``workflowType=machine_learning``): its UI decides the page by the global
workflow toggle, so the ``mlflow.experimentKind`` tag (set here too, for the experiment list and other
MLflow versions) does not change the landing page by itself. The description is MLflow's
``mlflow.note.content`` (shown above the runs table). The key metrics are a saved view
(``mlflow.sharedViewState.<id>``, the envelope the UI's "Views" menu writes): each run that finishes
adds the metrics it logged that match its stage's ``columns``, so the view names only columns that exist.
``landing_url`` is the runs table in that view; ``lorascope ui`` prints it for each experiment.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

PREFIX = "lorascope-"
"""Experiment names are ``lorascope-<stage>``."""
KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"
VIEW_ID = "lorascope"
VIEW_TAG = "mlflow.sharedViewState." + VIEW_ID
VIEW_NAME = "lorascope: key metrics"
MAX_COLUMNS = 40
"""Columns a view keeps (a tag value is bounded; the table stays readable)."""


@dataclass(frozen=True)
class Experiment:
    """The face of one stage's experiment ``lorascope-<stage>``."""

    description: str
    """What the stage does, what its runs log, how to compare them (markdown, above the runs table)."""
    columns: tuple[str, ...]
    """Metric-name patterns (``fnmatch``, case-sensitive) shown as columns (the UI orders them by name)."""
    dataset: bool = False
    """Show the runs' input datasets column (stages that ``mlflow.log_input`` their data)."""


EXPERIMENTS: dict[str, Experiment] = {
    "base": Experiment(
        "Pretrains the tiny organism's base (or records a real base's config). One run per base; compare "
        "`pretrain.final_loss` across `base.*` params.",
        ("pretrain.final_loss", "parameters"),
    ),
    "prepare": Experiment(
        "Tokenizes the reasoning traces (s1K-1.1 or the synthetic set) into the training table and the "
        "local benchmark files. The Dataset column names the source; compare `rows`, `tokens_total`, "
        "`truncated_fraction`.",
        ("rows", "tokens_total", "tokens_mean", "truncated_fraction"),
        dataset=True,
    ),
    "finetune": Experiment(
        "Trains the rank-1 LoRA (run `lora`) and the full finetune (run `full`) on the prepared traces. "
        "Compare `train_loss` and the loss curve (Chart view); `trainable_parameters` tells the two apart.",
        ("train_loss", "trainable_parameters", "train_runtime", "train_tokens_per_second"),
    ),
    "evaluate": Experiment(
        "Scores each variant (base, full, lora, the two ablated LoRAs: one run each, with the benchmark "
        "files as datasets) on AIME'24, MATH500 and GPQA-Diamond, and Tables 1 and 2 (run `recovery`). "
        "Compare `<task>.score` across variant runs; `<task>.recovery` is the share of the full "
        "finetune's gain the LoRA recovers.",
        ("*.score", "*.recovery", "*.recovery.lora-attn-ablated", "*.recovery.lora-mlp-ablated"),
        dataset=True,
    ),
    "ablate": Experiment(
        "KL and CE of the LoRA with one component, layer or projection group ablated, on held-out "
        "traces (Figure 3). Compare `groups.*.kl` (attention vs MLP) and `reference.kl_lora_base`.",
        ("groups.*.kl", "groups.*.delta_ce", "reference.kl_lora_base"),
    ),
    "extract": Experiment(
        "Records the adapter's per-token activations (x·A) and the MLP neurons into the activation store "
        "(runs `lora`, `mlp`). `merge_check.passed` says the recorded state reproduces the model.",
        ("tokens", "documents", "merge_check.passed", "merge_check.max_relative_error"),
    ),
    "sae": Experiment(
        "Trains the cross-layer BatchTopK SAE on the adapter state. Compare `fvu` (held-out), "
        "`l0_calibrated`, dead latents and `lora_effect_recovered` (the spliced LoRA's effect kept).",
        ("fvu", "fvu_normalised", "l0_calibrated", "alive_latents", "dead_latents", "lora_effect_recovered"),
    ),
    "contexts": Experiment(
        "Max-activating contexts and quantile samples of every feature (one run per source). "
        "Compare `features` and `dead_features`.",
        ("features", "dead_features", "tokens", "excluded_tokens"),
    ),
    "autointerp": Experiment(
        "Labels every feature from its contexts with an LLM and scores each label by detection (one run "
        "per source). Compare `detection_balanced_accuracy`, `labelled` and `failed`.",
        ("detection_balanced_accuracy", "labelled", "failed", "requests"),
    ),
    "categorize": Experiment(
        "Groups the labels into categories (Figure 2). Compare `categories`, `uncategorized` and "
        "`cost_usd` across label sets and models.",
        ("categories", "uncategorized", "cost_usd"),
    ),
    "steer": Experiment(
        "Steers along a chosen feature: backtracking per 1k tokens and accuracy at each α (one child run "
        "per α). Compare `backtracks_per_1k` and `accuracy` against `alpha`.",
        ("alpha", "backtracks_per_1k", "accuracy"),
    ),
    "attribute": Experiment(
        "Which components and SAE latents the organism's behaviour depends on: the screen's ranking, "
        "exact ablations and generated accuracy effects. Compare `spearman_components` (screen vs exact) "
        "and `delta_accuracy`.",
        ("spearman_components", "spearman_measured", "delta_accuracy", "mean_delta_ce.top", "mean_delta_ce.control"),
    ),
    "report": Experiment(
        "Renders the README-style report, the paper's figures and the dashboard from every stage's "
        "outputs. `missing_items` counts what was not there to render.",
        ("missing_items",),
    ),
}  # fmt: skip


def tags(stage: str) -> dict[str, str]:
    """The experiment tags set when ``lorascope-<stage>`` is created (and added to an older one)."""
    return {KIND_TAG: KIND, NOTE_TAG: EXPERIMENTS[stage].description}


def columns(stage: str, metric_keys: Any, shown: list[str]) -> list[str]:
    """``shown`` (the view's columns) plus the metrics among ``metric_keys`` that match ``stage``'s
    patterns, by name (the order the UI shows them in); the runs' dataset column first where the stage
    logs one."""
    exp = EXPERIMENTS[stage]
    first = ["attributes.`Dataset`"] if exp.dataset else []
    have = {c.removeprefix("metrics.`").removesuffix("`") for c in shown if c.startswith("metrics.")}
    names = have | {k for k in metric_keys if any(fnmatchcase(k, p) for p in exp.columns)}
    return (first + [f"metrics.`{n}`" for n in sorted(names)])[:MAX_COLUMNS]


def view(tag_value: str | None) -> list[str]:
    """The columns of a saved view's tag value (none when absent or not ours)."""
    try:
        return list(json.loads(json.loads(tag_value or "")["state"])["selectedColumns"])
    except (ValueError, KeyError, TypeError):
        return []


def view_value(cols: list[str]) -> str:
    """A saved view's tag value: the envelope MLflow's UI writes (name, times in ms, the state as JSON)."""
    now = int(time.time() * 1000)
    state = json.dumps({"selectedColumns": cols})
    return json.dumps({"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": state})


def landing_url(base: str, experiment_id: str) -> str:
    """The runs table of an experiment in the key-metrics view, model-training workflow."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_ID}&workflowType=machine_learning"


def home_url(base: str) -> str:
    """The experiment list in the model-training workflow."""
    return f"{base.rstrip('/')}/#/experiments?workflowType=machine_learning"


def landings(client: Any, base: str) -> list[tuple[str, str]]:
    """``(stage, landing_url)`` of each ``lorascope-*`` experiment in ``client``'s store, by stage name."""
    found = [e for e in client.search_experiments() if e.name.startswith(PREFIX)]
    return sorted((e.name.removeprefix(PREFIX), landing_url(base, e.experiment_id)) for e in found)
