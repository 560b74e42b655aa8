"""One trial: an isolated workspace, the stage's own code with overridden params, the objective.

A trial runs in ``sweeps/<study>/trial-<n>/``: the inputs it reads (``models/base``, prepared data,
the adapter or the activation store) are linked from the real workspace, its outputs and checkpoints
stay inside it and are removed afterwards. The trial's code sees that folder as its workspace root
through a context variable (``project.use_workspace``), with the real store root and tracking URI passed
explicitly: nothing in ``os.environ`` changes, so trials in parallel threads never cross roots. MLflow
logs to the real workspace's store, the stage's run nested under the study's parent run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorascope import paths
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.sweep.space import Space

LORA_INPUTS = (paths.BASE.as_posix(),)
SAE_INPUTS = tuple(p.as_posix() for p in (paths.BASE, paths.LORA, paths.activations("lora")))


@contextlib.contextmanager
def trial_workspace(
    root: Path, study: str, number: int, links: tuple[str, ...], *, store: Path, tracking_uri: str
) -> Iterator[Path]:
    """A fresh workspace whose ``links`` point at the real workspace's paths, the workspace root of the
    code inside the block (which logs to ``tracking_uri``, with ``store`` as its store root); removed
    at the end."""
    from lorascope.project import use_workspace
    from lorascope.tracking import use_tracking_uri

    ws = root / "sweeps" / study / f"trial-{number}"
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    (ws / "dvc.yaml").write_text("stages: {}\n")
    for rel in links:
        if not (root / rel).exists():
            raise LorascopeError(f"{root / rel}: missing; run `dvc repro` up to the stage being swept first")
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).symlink_to(root / rel, target_is_directory=True)
    try:
        with use_workspace(ws, store), use_tracking_uri(tracking_uri):
            yield ws
    finally:
        shutil.rmtree(ws, ignore_errors=True)
        with contextlib.suppress(OSError):  # the study's folder, once no trial of it runs here
            ws.parent.rmdir()


def split_prepared(root: Path, ws: Path, fraction: float) -> list[dict[str, Any]]:
    """Write the trial's ``data/prepared`` without the held-out rows (chosen by a hash of their id)
    and return the held-out rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from lorascope.prepare import table as prepared_table

    table = prepared_table.read(root / paths.PREPARED)
    cut = int(fraction * 2**32)
    held = [
        int.from_bytes(hashlib.sha1(i.encode()).digest()[:4], "big") < cut
        for i in table.column("id").to_pylist()
    ]
    mask = pa.array(held)
    if not any(held) or all(held):
        raise LorascopeError(
            f"validation_fraction {fraction} leaves no {'held-out' if not any(held) else 'training'} rows"
        )
    dst = ws / paths.PREPARED
    dst.mkdir(parents=True)
    prepared_table.write(dst, table.filter(pc.invert(mask)))
    return table.filter(mask).select(["input_ids", "loss_start"]).to_pylist()


def heldout_loss(model: Any, rows: list[dict[str, Any]], pad_token_id: int) -> float:
    """Mean cross-entropy per trained token over ``rows`` (the training loss mask)."""
    import torch

    from lorascope.finetune.data import IGNORE, Collator

    collate = Collator(pad_token_id)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(rows), 4):
            batch = {k: v.to(device) for k, v in collate(rows[i : i + 4]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
            )
            total += float(loss)
            tokens += int((labels != IGNORE).sum())
    model.train(was_training)
    return total / max(tokens, 1)


def run_lora(trial: Any, params: Params, space: Space, root: Path, ws: Path) -> list[float]:
    """Finetune the LoRA with the finetune stage's code; report the held-out loss each epoch."""
    import optuna
    from transformers import TrainerCallback

    from lorascope.finetune.stage import run
    from lorascope.models import load_tokenizer
    from lorascope.tracking import extra_tags, producer

    heldout = split_prepared(root, ws, space.validation_fraction)
    prepared = producer(root / paths.PREPARED, name=paths.PREPARED.as_posix())  # the data the split came from
    pad = load_tokenizer(ws / paths.BASE).pad_token_id
    prune = len(space.objectives) == 1
    last: dict[str, float] = {}

    class Report(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kw):  # noqa: ANN001, ANN003, ANN201
            last["loss"] = heldout_loss(model, heldout, pad)
            if prune:
                trial.report(last["loss"], math.ceil(state.epoch or 0))  # epoch 1, 2, ...
                if trial.should_prune():
                    raise optuna.TrialPruned(f"held-out loss {last['loss']:.4f} at epoch {state.epoch:.2f}")

    with extra_tags({"upstream.prepare": prepared["run_id"]} if prepared else {}):
        run(params, "lora", callbacks=[Report()])
    if "loss" not in last:  # fewer steps than an epoch: measure the saved adapter
        from lorascope.models import load_adapter, load_model

        model = load_adapter(load_model(ws / paths.BASE), ws / paths.LORA)
        last["loss"] = heldout_loss(model, heldout, pad)
    return [last["loss"]]


def run_sae(trial: Any, params: Params, space: Space, root: Path, ws: Path) -> list[float]:
    """Train the SAE with the sae stage's code; report the training loss every ``report_every`` steps."""
    import optuna

    from lorascope.sae.stage import run

    prune = len(space.objectives) == 1

    def report(step: int, metrics: dict[str, float]) -> None:
        if prune and step % space.report_every == 0:
            trial.report(metrics["mse"], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"training mse {metrics['mse']:.4f} at step {step}")

    run(params, on_step=report)
    metrics = json.loads((ws / paths.SAE_METRICS).read_text())
    missing = [o for o in space.objectives if o not in metrics]
    if missing:
        raise LorascopeError(
            f"objectives {missing} not measured (kl_lora_spliced needs models/lora and sae.kl_sequences > 0)"
        )
    return [float(metrics[o]) for o in space.objectives]
