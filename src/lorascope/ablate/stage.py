"""Run the ``ablate`` stage: KL sweeps into ``metrics/ablation/`` and ablated-adapter exports.

Outputs (nats; ``kl_definitions`` in each file says which tokens each KL averages):

* ``{components,layers,types,groups}.json``: per ablation ``kl`` = KL(P_lora || P_ablated) (the
  direction is named in each file) per response token, its standard error over sequences, ``kl_max``
  over response tokens, ``kl_all_positions`` (every predicted position, prompt included, mean per
  sequence then over sequences: how the paper's code averaged it), ``ce`` and ``delta_ce`` =
  CE(ablated) - CE(lora) per response token; a ``reference`` block with the adapter's and the base
  model's cross-entropy and KL(P_lora || P_base) (every component ablated), over both token sets;
* ``figure3.json``: the single-component KL as a layer x component-type matrix (Figure 3), over
  response tokens (``kl``) and over all positions (``kl_all_positions``).

Each sequence's sums go to ``checkpoints/ablate/`` as soon as it is measured, so a killed run resumes
at the next sequence and ends with the same files; other params or inputs start over
(``lorascope.resume``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorascope import paths
from lorascope.ablate.runner import DIRECTION, Stats
from lorascope.ablate.targets import Ablation
from lorascope.atomic import write_json
from lorascope.components import Component, component_key
from lorascope.config import Params
from lorascope.project import workspace_root
from lorascope.sections import LORA_TARGETS

if TYPE_CHECKING:
    from lorascope.ablate.runner import Ablator

PREPARED = paths.PREPARED
BASE = paths.BASE
ADAPTER = paths.LORA
SWEEPS = ("components", "layers", "types", "groups")
UNIT = "nats per response token (mean over every response token of the sampled sequences)"
KL_DEFINITIONS = {
    "kl": "KL(P_lora || P_ablated) summed over the vocabulary at each position predicting a response "
    "token (the assistant turn), averaged over all those tokens of the sampled sequences (token-weighted)",
    "kl_all_positions": "KL(P_lora || P_ablated) at every position of each sampled sequence (each token "
    "predicted from the one before it, prompt included), mean per sequence, then mean over sequences: "
    "the paper's code (F.kl_div(log P_ablated, P_lora), .sum(-1).mean() per sequence, np.mean over them)",
}
CHECKPOINT_VERSION = "v2"
"""Bumped when what a per-sequence checkpoint holds changes (v2: the all-position KL sums)."""
DELTA_CE = "CE(P_ablated) - CE(P_lora) on the next response token, nats per token"


def out_dir() -> Path:
    return workspace_root() / paths.ABLATION


def summarize(per_seq: list[Stats], lora: list[Stats]) -> dict[str, Any]:
    """Token-weighted means over sequences, and the standard error of the per-sequence mean KL."""
    tokens = sum(s.tokens for s in per_seq)
    means = [s.kl_sum / s.tokens for s in per_seq]
    stderr = None
    if len(means) > 1:
        mu = sum(means) / len(means)
        stderr = math.sqrt(sum((m - mu) ** 2 for m in means) / (len(means) - 1) / len(means))
    ce = sum(s.ce_sum for s in per_seq) / tokens
    return {
        "kl": sum(s.kl_sum for s in per_seq) / tokens,
        "kl_all_positions": sum(s.all_kl_sum / s.all_tokens for s in per_seq) / len(per_seq),
        "kl_stderr": stderr,
        "kl_max": max(s.kl_max for s in per_seq),
        "ce": ce,
        "delta_ce": ce - sum(s.ce_sum for s in lora) / tokens,
    }


def figure3(comps: list[Component], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Single-component KL as ``kl[layer][type]`` (null where a layer has no such component)."""
    layers = sorted({c.layer for c in comps})
    kinds = [k for k in LORA_TARGETS if any(c.kind == k for c in comps)]
    grid = {
        key: [[(results.get(component_key(n, k)) or {}).get(key) for k in kinds] for n in layers]
        for key in KL_DEFINITIONS
    }
    return {"direction": DIRECTION, "unit": UNIT, "kl_definitions": KL_DEFINITIONS, "layers": layers,
            "types": kinds, **grid}  # fmt: skip


def _measure_all(
    ablator: Ablator, seqs: list[tuple[str, list[int], int]], measured: list[Ablation], work: Path
) -> tuple[list[tuple[Stats, list[Stats]]], int]:
    """Each sequence's sums (the adapter's and each ablation's), from its checkpoint when a killed run
    left one, else measured and checkpointed; returns them and how many were resumed."""
    import torch

    from lorascope.progress import track

    resumed = 0
    per_seq: list[tuple[Stats, list[Stats]]] = []
    for i, (_row, ids, first) in enumerate(track(seqs, "ablate", total=len(seqs))):
        path = work / f"{i:05d}.{CHECKPOINT_VERSION}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            per_seq.append((Stats(**saved["lora"]), [Stats(**s) for s in saved["ablations"]]))
            resumed += 1
            continue
        lora, stats = ablator.measure(torch.tensor(ids), first, measured)
        write_json(path, {"lora": lora.to_json(), "ablations": [s.to_json() for s in stats]})
        per_seq.append((lora, stats))
    return per_seq, resumed


def _header(loras: list[Stats], base: dict[str, Any], sequences: int) -> dict[str, Any]:
    """What every sweep file starts with: the KL's direction, units and definitions, the sample, and the
    reference block (the adapter's and the base model's cross-entropy, KL(P_lora || P_base))."""
    tokens = sum(s.tokens for s in loras)
    return {
        "direction": DIRECTION,
        "unit": UNIT,
        "delta_ce_definition": DELTA_CE,
        "kl_definitions": KL_DEFINITIONS,
        "sequences": sequences,
        "tokens": tokens,
        "reference": {
            "ce_lora": sum(s.ce_sum for s in loras) / tokens,
            "ce_base": base["ce"],
            "kl_lora_base": base["kl"],
            "kl_lora_base_all_positions": base["kl_all_positions"],
        },
    }


def _write_sweeps(
    header: dict[str, Any],
    results: dict[str, dict[str, Any]],
    ablations: list[Ablation],
    comps: list[Component],
) -> list[Path]:
    """One file per sweep and ``figure3.json`` in ``metrics/ablation/``; returns their paths."""
    out = out_dir()
    files = []
    for sweep in SWEEPS:
        chosen = {
            a.name: {**results[a.name], "n_components": len(a.components)}
            for a in ablations
            if a.sweep == sweep
        }
        files.append(out / f"{sweep}.json")
        write_json(files[-1], {**header, "sweep": sweep, "ablations": chosen})
    files.append(out / paths.FIGURE3.name)
    write_json(files[-1], figure3(comps, results))
    return files


def _log_run(
    header: dict[str, Any],
    results: dict[str, dict[str, Any]],
    ablations: list[Ablation],
    resumed: int,
    comps: list[Component],
    files: list[Path],
) -> None:
    """Every ablation's KL and delta CE as the run's metrics (in batches MLflow accepts), the
    reference, the sample's size, and the files as artifacts."""
    import mlflow

    metrics = {f"reference.{k}": v for k, v in header["reference"].items()}
    metrics |= {
        "sequences": float(header["sequences"]),
        "tokens": float(header["tokens"]),
        "sequences_resumed": float(resumed),
    }
    for a in ablations:
        metrics[f"{a.sweep}.{a.name}.kl"] = results[a.name]["kl"]
        metrics[f"{a.sweep}.{a.name}.kl_all_positions"] = results[a.name]["kl_all_positions"]
        metrics[f"{a.sweep}.{a.name}.delta_ce"] = results[a.name]["delta_ce"]
    items = list(metrics.items())
    for lo in range(0, len(items), 500):
        mlflow.log_metrics(dict(items[lo : lo + 500]))
    mlflow.log_params({"direction": DIRECTION, "ablations": len(ablations), "components": len(comps)})
    for f in files:
        mlflow.log_artifact(str(f), "ablation")


def run(params: Params) -> Path:
    """Measure every requested ablation; returns ``metrics/ablation/``."""
    from lorascope.ablate.runner import Ablator
    from lorascope.ablate.targets import sweeps
    from lorascope.components import lora_components
    from lorascope.models import load_lora_model
    from lorascope.prepare import table as prepared_table
    from lorascope.tracking import stage_run

    cfg, root = params.ablate, workspace_root()
    prepared, base_dir, adapter_dir = root / PREPARED, root / BASE, root / ADAPTER
    seqs = prepared_table.sample(prepared, cfg.sequences, cfg.max_tokens, cfg.seed, "ablate.max_tokens")
    model = load_lora_model(base_dir, adapter_dir, cfg.precision, cfg.device, "ablate")
    comps = lora_components(model)
    ablations = sweeps(comps, cfg.sweeps, cfg.custom)
    every = tuple(range(len(comps)))  # the base model: reported as the reference
    reference = next((a for a in ablations if a.components == every), Ablation("base", "reference", every))
    measured = ablations if reference in ablations else [*ablations, reference]
    ablator = Ablator(model, comps, cfg.batch_size, cfg.logit_chunk, cfg.prefix_reuse)

    with stage_run("ablate", params, [prepared, base_dir, adapter_dir]) as sr:
        work = root / paths.checkpoints("ablate")
        sr.claim(work)
        work.mkdir(parents=True, exist_ok=True)
        per_seq, resumed = _measure_all(ablator, seqs, measured, work)

        loras = [lora for lora, _ in per_seq]
        results = {a.name: summarize([s[k] for _, s in per_seq], loras) for k, a in enumerate(measured)}
        base = results[reference.name] if reference in ablations else results.pop(reference.name)
        header = _header(loras, base, len(seqs))
        files = _write_sweeps(header, results, ablations, comps)
        sr.log_outputs(*files)
        _log_run(header, results, ablations, resumed, comps, files)
    return out_dir()
