"""``finetune`` params: the LoRA adapter and the full finetune."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from lorascope.sections import LORA_TARGETS, Fraction, PositiveFloat, PositiveInt, Precision, Section


class LoraAdapter(Section):
    """The adapter: rank, scaling and where it is attached (peft ``LoraConfig``)."""

    r: PositiveInt = 1
    """Rank of every adapted matrix; 1 makes each component one scalar per token."""
    alpha: PositiveFloat = 16
    """``lora_alpha``; the update is scaled by alpha/sqrt(r) with rsLoRA, alpha/r without."""
    use_rslora: bool = True
    """Rank-stabilised scaling (alpha / sqrt(r))."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout on the adapter input during training."""
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    """Linear modules to adapt in each layer (default: all seven projections); checked against the
    model when the adapter is built."""
    layers: list[Annotated[int, Field(ge=0)]] | None = None
    """Layer indices to adapt; null adapts every layer."""

    @field_validator("target_modules")
    def _targets_nonempty_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must list at least one projection")
        if len(set(v)) != len(v):
            raise ValueError(f"must not repeat a projection, got {v}")
        return v


class FinetuneSection(Section):
    """``finetune``: the rank-1 LoRA and the full-parameter finetune, one training recipe."""

    lr: PositiveFloat = 1e-3
    """Peak learning rate of the LoRA finetune."""
    full_lr: PositiveFloat = 1e-5
    """Peak learning rate of the full-parameter finetune (s1 used 1e-5)."""
    lora: LoraAdapter = Field(default_factory=LoraAdapter)
    """Adapter shape and placement."""
    adam_betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    """AdamW decoupled weight decay."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Fraction of all optimizer steps spent warming up linearly (< 1)."""
    epochs: PositiveFloat = 5
    """Passes over the prepared training set."""
    global_batch_size: PositiveInt = 16
    """Sequences per optimizer step across all processes (micro-batch x accumulation x processes)."""
    micro_batch_size: PositiveInt = 1
    """Sequences per forward pass on one device."""
    precision: Precision = "auto"
    """Training precision: ``bfloat16`` loads the weights in bf16 and trains with bf16 autocast;
    ``float16`` keeps float32 master weights and trains with fp16 autocast and loss scaling;
    ``float32`` is plain fp32; ``auto`` is bfloat16 on a GPU that supports it, float32 otherwise.
    The LoRA's own weights stay float32 in every precision."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (non-reentrant) to fit long sequences."""
    seed: int = 42
    """Seed for initialisation and data order."""
    max_steps: Annotated[int, Field(ge=-1)] = -1
    """Stop after this many optimizer steps; -1 runs all epochs (smoke runs and sweeps set it)."""
    checkpoint_steps: PositiveInt = 50
    """Save a resumable checkpoint (weights, optimizer, scheduler, RNG) every N optimizer steps; a
    killed run started again resumes from the last one."""
    logging_steps: PositiveInt = 1
    """Log loss / lr / grad-norm / tokens per second to MLflow every N optimizer steps."""
    launcher: str = "lorascope"
    """What ``dvc repro`` runs the stage with: ``lorascope`` (one process) or e.g.
    ``accelerate launch --config_file pipelines/accelerate/fsdp.yaml -m lorascope.cli`` (multi-GPU)."""

    @model_validator(mode="after")
    def _batch_divides(self) -> FinetuneSection:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must divide global_batch_size "
                f"({self.global_batch_size})"
            )
        return self
