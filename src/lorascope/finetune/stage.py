"""Run the ``finetune`` stage for one variant (``lora`` or ``full``) with the Hugging Face Trainer.

One code path for both variants: the LoRA wraps the base model with peft, the full finetune trains
every parameter. Under ``accelerate launch`` every process trains, rank 0 alone tracks and writes.
Checkpoints go to ``checkpoints/finetune/<variant>/`` every ``finetune.checkpoint_steps``; a run that
was killed resumes from the last one (when its inputs and params are unchanged) and is removed once
the final model is in place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lorascope import paths
from lorascope.atomic import write_json
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.project import workspace_root
from lorascope.resume import release

if TYPE_CHECKING:
    from lorascope.tracking import StageRun

Variant = Literal["lora", "full"]
PREPARED = paths.PREPARED
BASE = paths.BASE


def out_dir(variant: str) -> Path:
    """``models/<variant>/`` at the workspace root."""
    return workspace_root() / paths.model(variant)


def checkpoint_dir(variant: str) -> Path:
    """Where resumable checkpoints of ``variant`` live until the run completes."""
    return workspace_root() / paths.checkpoints("finetune") / variant


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient-accumulation steps reaching ``global_batch`` exactly; a one-line error otherwise."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise LorascopeError(
            f"finetune.global_batch_size ({global_batch}) must be divisible by micro_batch_size x processes "
            f"({micro_batch} x {world_size} = {per_step})"
        )
    return global_batch // per_step


def training_dtype(precision: str) -> Any:
    """The training dtype for ``finetune.precision`` on this machine (the Trainer's device: the GPU
    when there is one). float16 needs a GPU: accelerate runs fp16 autocast and loss scaling on GPUs
    only, so on the CPU it would silently train in float32."""
    import torch

    from lorascope.devices import resolve

    device, dtype = resolve("auto", precision, "finetune")
    if dtype == torch.float16 and device.type == "cpu":
        raise LorascopeError(
            "finetune.precision: float16 training needs a CUDA GPU (fp16 autocast with loss scaling); "
            "use bfloat16 or float32 on the CPU"
        )
    return dtype


def weights_dtype(precision: str, variant: str) -> Any:
    """The dtype the weights are loaded in: bfloat16 as trained; under float16 the base of a LoRA is
    frozen, so it is loaded in fp16, while a full finetune keeps float32 master weights."""
    import torch

    dtype = training_dtype(precision)
    return torch.float32 if dtype == torch.float16 and variant == "full" else dtype


def build_model(params: Params, variant: Variant, base_dir: Path) -> Any:
    """The model to train: base + fresh LoRA adapter, or the whole base model."""
    import torch

    from lorascope.models import load_model

    cfg = params.finetune
    model = load_model(base_dir, dtype=weights_dtype(cfg.precision, variant))
    model.config.use_cache = False  # no KV cache while training (and required by checkpointing)
    if variant == "full":
        return model
    from peft import get_peft_model

    from lorascope.finetune.adapter import lora_config
    from lorascope.models import source

    torch.manual_seed(cfg.seed)  # lora_A initialisation
    peft_model = get_peft_model(model, lora_config(cfg.lora, model))
    # While saving, peft reads the base config from this path to decide whether to save embeddings:
    # give it the absolute one (a relative path would resolve against the current directory);
    # the saved adapter_config.json gets the portable name afterwards (name_adapter_base).
    peft_model.peft_config["default"].base_model_name_or_path = source(base_dir)[0]
    return peft_model


def name_adapter_base(adapter_dir: Path, base_dir: Path) -> None:
    """Record the base in ``adapter_config.json`` and peft's model card as ``model_name`` does: the
    hub id, or the path relative to the workspace, so adapters do not embed this machine's absolute
    paths; and list the target modules sorted (peft keeps a set, whose order varies by process)."""
    from lorascope.models import model_name

    name = model_name(base_dir)
    from lorascope.models import ADAPTER_CONFIG

    config_path = adapter_dir / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = name
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    write_json(config_path, config)
    card = adapter_dir / "README.md"
    if card.is_file():
        text = card.read_text()
        for absolute in {str(base_dir), str(base_dir.resolve())}:
            text = text.replace(absolute, name)
        card.write_text(text)


def parameter_counts(model: Any) -> dict[str, float]:
    """Trainable and total parameters (adapter included) and the trainable fraction."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_fraction": trainable / total,
    }


def training_arguments(params: Params, variant: Variant, world_size: int, output_dir: Path) -> Any:
    """Trainer arguments straight from params: AdamW, schedule, batch arithmetic, precision."""
    import torch
    from transformers import TrainingArguments

    cfg = params.finetune
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=cfg.lr if variant == "lora" else cfg.full_lr,
        optim="adamw_torch_fused",  # its sqrt is ATen's own: the same on every CPU (lorascope.kernels)
        adam_beta1=cfg.adam_betas[0],
        adam_beta2=cfg.adam_betas[1],
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of all steps
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=accumulation_steps(
            cfg.global_batch_size, cfg.micro_batch_size, world_size
        ),
        bf16=training_dtype(cfg.precision) == torch.bfloat16,
        fp16=training_dtype(cfg.precision) == torch.float16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.checkpoint_steps,
        save_total_limit=2,
        report_to="none",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
    )


def _resume_point(run: StageRun | None, variant: str, state: Any) -> str | None:
    """The last checkpoint if it belongs to this exact run (same params and inputs), else None:
    rank 0 (the one with the stage ``run``) claims the checkpoint directory (removing stale
    checkpoints), then every rank reads it."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = checkpoint_dir(variant)
    if run is not None:
        run.claim(ckpt_dir, variant=variant)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None


def _log_setup(
    variant: Variant, args: Any, processes: int, resume: str | None, model: Any, counts: dict[str, float]
) -> None:
    """The run's params (launch, batch arithmetic, precision in force, the checkpoint resumed from)
    and the model's parameter counts (and, for the LoRA, the modules it adapts)."""
    import mlflow

    from lorascope.finetune.adapter import adapted_modules

    mlflow.log_params(
        {
            "variant": variant,
            "processes": processes,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "effective_lr": args.learning_rate,
            "bf16_active": args.bf16,
            "fp16_active": args.fp16,
            "resumed_from": Path(resume).name if resume else "none",
        }
    )
    if variant == "lora":
        counts["adapted_modules"] = len(adapted_modules(model))
    mlflow.log_metrics({k: float(v) for k, v in counts.items()})


def _save_partial(trainer: Any, partial: Path, state: Any) -> None:
    """Save the trained model into ``partial`` from every rank (FSDP / ZeRO-3 gather the weights
    before rank 0 writes), after rank 0 cleared what a killed run left there."""
    if state.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    state.wait_for_everyone()
    trainer.save_model(str(partial))
    state.wait_for_everyone()


def _publish(
    run: StageRun, variant: Variant, partial: Path, out: Path, base_dir: Path, tokenizer: Any, result: Any
) -> None:
    """Rank 0: make ``partial`` the output (the full model with its tokenizer, or the adapter naming
    its base portably), move it into place, log the loss and outputs, and drop the checkpoints."""
    import mlflow

    from lorascope.models import save_tokenizer

    (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle; the params are in MLflow
    if variant == "full":
        save_tokenizer(tokenizer, partial)
    else:
        name_adapter_base(partial, base_dir)
    mlflow.log_metrics({"train_loss": float(result.training_loss), "global_steps": float(result.global_step)})
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    if variant == "lora":  # full weights are referenced by their DVC md5, never copied
        mlflow.log_artifacts(str(out), artifact_path="adapter")
    run.log_outputs(out)
    release(checkpoint_dir(variant))


def run(params: Params, variant: Variant, callbacks: Sequence[Any] = ()) -> Path:
    """Train ``variant`` and write ``models/<variant>/`` (adapter or full weights).

    ``callbacks`` are extra ``TrainerCallback``s (the tests use one to simulate a kill).
    """
    import torch
    from accelerate import PartialState
    from transformers import Trainer

    from lorascope.finetune.data import Collator, PreparedRows
    from lorascope.finetune.step_logger import MlflowStepLogger
    from lorascope.models import load_tokenizer
    from lorascope.tracking import stage_run

    root = workspace_root()
    prepared, base_dir, out = root / PREPARED, root / BASE, out_dir(variant)
    dataset = PreparedRows(prepared)  # one-line error when prepare has not run
    # cpu=True is what lets several CPU processes (torchrun / accelerate launch) form a gloo group
    state = PartialState(cpu=not torch.cuda.is_available())
    args = training_arguments(params, variant, state.num_processes, checkpoint_dir(variant))
    tokenizer = load_tokenizer(base_dir)
    model = build_model(params, variant, base_dir)
    counts = parameter_counts(model)

    partial = out.with_name(f".{out.name}.partial")  # same path on every rank: save_model gathers into it
    tracked = (
        stage_run(
            "finetune",
            params,
            inputs=[prepared, base_dir],
            run_name=variant,
            tags={"finetune.variant": variant},
        )
        if state.is_main_process
        else nullcontext()
    )
    with tracked as tracked_run:
        resume = _resume_point(tracked_run, variant, state)
        if tracked_run is not None:
            _log_setup(variant, args, state.num_processes, resume, model, counts)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=Collator(tokenizer.pad_token_id),
            callbacks=[MlflowStepLogger(), *callbacks],
        )
        result = trainer.train(resume_from_checkpoint=resume)
        _save_partial(trainer, partial, state)
        if tracked_run is not None:
            _publish(tracked_run, variant, partial, out, base_dir, tokenizer, result)
    state.wait_for_everyone()
    return out
