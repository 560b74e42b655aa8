"""Run the ``sae`` stage: train on ``data/activations/lora``, calibrate, evaluate, write ``models/sae``.

Checkpoints (SAE, optimiser, schedule, data position, dead-latent counters) go to
``checkpoints/sae/`` every ``sae.checkpoint_steps``; a killed run resumes there (same params and
store) and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorascope import paths, resume
from lorascope.atomic import atomic_path, write_json
from lorascope.components import layer_key
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.extract.store import Store
from lorascope.project import workspace_root

if TYPE_CHECKING:
    from lorascope.sae.train import Trainer
    from lorascope.tracking import StageRun

STORE = paths.activations("lora")
OUT = paths.SAE
METRICS = paths.SAE_METRICS
BASE, ADAPTER = paths.BASE, paths.LORA


def checkpoint_path() -> Path:
    return workspace_root() / paths.checkpoints("sae") / "state.pt"


def _open_store(root: Path) -> Store:
    """The LoRA activation store the SAE trains on (another source's store is a one-line error)."""
    store = Store.open(root / STORE, hint="run `lorascope extract --source lora` first")
    if store.source != "lora":
        raise LorascopeError(f"{store.root}/index.json: holds source {store.source!r}, expected 'lora'")
    return store


def _train(
    trainer: Trainer,
    run: StageRun,
    ckpt: Path,
    device: Any,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> None:
    """Train to the planned step, resuming from ``ckpt`` when the run's claim kept it (same params and
    store) and checkpointing there; every 10th step's metrics go to MLflow, every step's to ``on_step``."""
    import mlflow

    from lorascope.progress import track

    def save_checkpoint() -> None:
        with atomic_path(ckpt) as tmp:
            torch.save({"trainer": trainer.state_dict()}, tmp)

    if run.claim(ckpt) and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False, map_location=device)
        trainer.load_state_dict(saved["trainer"])
    resumed_from = trainer.step
    p = trainer.plan
    mlflow.log_params(
        {"d_in": p.d_in, "d_sae": p.d_sae, "steps": p.steps, "dead_window_tokens": p.dead_window,
         "train_tokens": p.train_tokens, "resumed_from_step": resumed_from}
    )  # fmt: skip
    progress = iter(track(range(resumed_from, p.steps), "sae: training", total=p.steps - resumed_from))

    def log_step(step: int, metrics: dict[str, float]) -> None:
        next(progress, None)
        if step % 10 == 0 or step == p.steps:
            mlflow.log_metrics({f"train_{k}": v for k, v in metrics.items()}, step=step)
        if on_step is not None:
            on_step(step, metrics)

    ckpt.parent.mkdir(parents=True, exist_ok=True)
    trainer.run(on_step=log_step, save=save_checkpoint)
    next(progress, None)


def _calibrated(
    trainer: Trainer, store: Store, held: Any, device: Any
) -> tuple[Any, float, int, dict[str, Any]]:
    """The trained SAE with its input scale folded in and its threshold calibrated on one heldout part,
    evaluated on the other: ``(sae, threshold, calibration tokens, evaluation)``."""
    from lorascope.sae.train import calibrate, evaluate, fold, heldout_batches

    cfg, excl = trainer.cfg, trainer.exclusion
    raw = fold(trainer.sae, trainer.scale_D).eval()
    threshold, n_cal = calibrate(
        raw,
        heldout_batches(store, held, 0, cfg.calibration_tokens, device, excl),
        cfg.k,
        cfg.calibration_tokens,
    )
    raw.threshold.fill_(threshold)
    ev = evaluate(raw, heldout_batches(store, held, 1, cfg.calibration_tokens, device, excl))
    return raw, threshold, n_cal, ev


def _alive(trainer: Trainer, ev: dict[str, Any]) -> list[int]:
    """Latents that fired on the evaluation tokens or within the dead window of training."""
    alive_F = ev["fired_F"] | (trainer.since_fired_F.cpu() < trainer.plan.dead_window)
    return alive_F.nonzero().flatten().tolist()


def _quality(
    trainer: Trainer, store: Store, ev: dict[str, Any], threshold: float, n_cal: int, alive: list[int]
) -> dict[str, Any]:
    """``metrics/sae.json``: FVU overall, per component, layer and type (raw and in per-component RMS
    units), L0, threshold, live latents and the tokens trained, calibrated, evaluated and excluded."""
    from lorascope.sae.train import grouped_fvu

    cfg, p = trainer.cfg, trainer.plan
    modules = store.index["modules"]
    layers = [layer_key(m["layer"]) for m in modules for _ in range(m["width"])]
    kinds = [m["kind"] for m in modules for _ in range(m["width"])]
    per_component = (ev["err_D"] / ev["var_D"].clamp(min=1e-12)).tolist()
    # per-component RMS units (what `scaling: per_component` trains in), whichever scaling trained
    unit_D = trainer.stats.rms_D.double().cpu().clamp(min=1e-6).square()
    err_n_D, var_n_D = ev["err_D"] / unit_D, ev["var_D"] / unit_D
    return {
        "fvu": float(ev["err_D"].sum() / ev["var_D"].sum()),
        "fvu_normalised": float(err_n_D.sum() / var_n_D.sum()),
        "fvu_mean_component": sum(per_component) / len(per_component),
        "fvu_by_layer": grouped_fvu(ev["err_D"], ev["var_D"], layers),
        "fvu_by_type": grouped_fvu(ev["err_D"], ev["var_D"], kinds),
        "fvu_normalised_by_layer": grouped_fvu(err_n_D, var_n_D, layers),
        "fvu_normalised_by_type": grouped_fvu(err_n_D, var_n_D, kinds),
        "l0_train": float(cfg.k),
        "l0_calibrated": ev["l0"],
        "threshold": threshold,
        "calibration_tokens": n_cal,
        "eval_tokens": ev["tokens"],
        "alive_latents": len(alive),
        "dead_latents": p.d_sae - len(alive),
        "nonfinite_tokens_dropped": trainer.stats.nonfinite_tokens,
        "excluded_tokens": trainer.stats.excluded.get("excluded", 0),
        **{f"excluded_{r}": n for r, n in trainer.stats.excluded.items() if r != "excluded"},
        "train_tokens": trainer.step * cfg.batch_size,
    }


def _splice(
    root: Path, trainer: Trainer, store: Store, held: Any, raw: Any, device: Any, dtype: Any
) -> dict[str, Any]:
    """The splice KL (the SAE's reconstruction in place of the adapter's ``x . A``) on the first
    ``kl_sequences`` heldout documents; none without an adapter or with ``kl_sequences`` 0."""
    from lorascope.sae.downstream import splice_kl

    cfg, excl, adapter = trainer.cfg, trainer.exclusion, root / ADAPTER
    from lorascope.models import ADAPTER_CONFIG

    if not (cfg.kl_sequences and (adapter / ADAPTER_CONFIG).is_file()):
        return {}
    held_docs = held.nonzero().flatten().tolist()[: cfg.kl_sequences]
    return splice_kl(
        root / BASE,
        adapter,
        store,
        held_docs,
        lambda x: raw.decode(raw.encode(x)),
        device,
        dtype,
        recorded=lambda acts, ids: excl.excluded(acts, ids, torch.zeros(1, dtype=torch.long)),
    )


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics as MLflow takes them: numbers, with each FVU group as its own ``fvu_<group>``."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    flat.update({f"fvu_{g}": v for g, v in metrics["fvu_by_layer"].items()})
    flat.update({f"fvu_{g}": v for g, v in metrics["fvu_by_type"].items()})
    for group in ("layer", "type"):
        flat.update({f"fvu_normalised_{g}": v for g, v in metrics[f"fvu_normalised_by_{group}"].items()})
    return {k: float(v) for k, v in flat.items()}


def _write_sae(
    out: Path, raw: Any, trainer: Trainer, store: Store, threshold: float, alive: list[int]
) -> None:
    """``models/sae/``: the weights with their cfg (scale folded in) and the live latents, together."""
    from lorascope.sae.load import save, write_alive

    cfg, p = trainer.cfg, trainer.plan
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save(
            raw,
            tmp,
            {
                "format": "lorascope-sae/1",
                "architecture": "batchtopk",
                "model": store.index.get("model"),
                "d_in": p.d_in,
                "d_sae": p.d_sae,
                "k": cfg.k,
                "threshold": threshold,
                "scaling": cfg.scaling,
                "scale": trainer.scale_D.tolist(),
                "scale_folded": True,
                "components": store.components,
                "training_tokens": trainer.step * cfg.batch_size,
            },
        )
        write_alive(tmp, alive, p.d_sae)


def run(params: Params, on_step: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Train the SAE; returns ``models/sae``. ``on_step`` sees every step's metrics (tests, sweeps)."""
    import mlflow

    from lorascope.devices import resolve
    from lorascope.sae.data import heldout_documents
    from lorascope.sae.train import Trainer
    from lorascope.tracking import stage_run

    cfg = params.sae
    root = workspace_root()
    store = _open_store(root)
    held = heldout_documents(store, cfg.heldout_fraction)
    device, dtype = resolve(cfg.device, cfg.precision, "sae")
    trainer = Trainer(store, held, cfg, device)
    ckpt = checkpoint_path()

    with stage_run("sae", params, inputs=[store.root], tags={"sae.scaling": cfg.scaling}) as tr:
        _train(trainer, tr, ckpt, device, on_step)
        raw, threshold, n_cal, ev = _calibrated(trainer, store, held, device)
        alive = _alive(trainer, ev)
        metrics = _quality(trainer, store, ev, threshold, n_cal, alive)
        metrics.update(_splice(root, trainer, store, held, raw, device, dtype))
        mlflow.log_metrics(_flat(metrics))

        out = root / OUT
        _write_sae(out, raw, trainer, store, threshold, alive)
        write_json(root / METRICS, metrics)
        mlflow.log_artifacts(str(out), artifact_path="sae")
        tr.log_outputs(out, root / METRICS)
    resume.release(ckpt)
    return out
