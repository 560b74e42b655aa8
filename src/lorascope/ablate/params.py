"""``ablate`` params: component ablations and ablated-adapter exports."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from lorascope.sections import Device, PositiveInt, Precision, Section

AblationSweep = Literal["components", "layers", "types", "groups"]
_ALL_SWEEPS: tuple[AblationSweep, ...] = ("components", "layers", "types", "groups")


class AblateSection(Section):
    """``ablate``: zero adapter components and measure KL(P_lora || P_ablated) and the change in
    cross-entropy per response token of sampled training sequences."""

    sequences: PositiveInt = 16
    """Training sequences sampled (with ``seed``) from the prepared data (the paper: 16)."""
    max_tokens: PositiveInt = 2048
    """Each sequence is cut to its first N tokens (the paper: up to 2048)."""
    seed: int = 0
    """Seed of the sequence sample."""
    sweeps: list[AblationSweep] = Field(default_factory=lambda: list(_ALL_SWEEPS))
    """Sweeps to run: every single component, every layer (all its components), every component type
    (e.g. all gate_proj), and the groups (all attention, all MLP, all components)."""
    custom: dict[str, list[str]] = Field(default_factory=dict)
    """Extra named ablations written to ``groups.json``: name -> selectors, each ``L<layer>.<type>`` (a
    component), ``L<layer>`` (a layer), a type (``q_proj`` ...), ``attn``, ``mlp`` or ``all``."""
    export: list[str] = Field(default_factory=lambda: ["attn", "mlp"])
    """Groups exported as peft adapters without their components (``models/lora-<group>-ablated``,
    evaluated as the variants of Table 2); each a selector as in ``custom``."""
    batch_size: PositiveInt = 8
    """Ablations run together as one batch (same start layer; bounded by GPU memory)."""
    prefix_reuse: bool = True
    """Run each ablation from the first layer it changes, on hidden states cached from one unablated
    pass (equal results, less work); false runs a full forward per ablation (the reference)."""
    logit_chunk: PositiveInt = 512
    """Positions per vocabulary projection and KL chunk (bounds memory: chunk x vocab x 4 bytes)."""
    precision: Precision = "auto"
    """Model compute dtype (``auto``: bfloat16 on a GPU that supports it, float32 otherwise); KL is
    always computed in float32."""
    device: Device = "auto"
    """Where the model runs: ``auto`` (a CUDA GPU when present), ``cpu``, ``cuda`` or ``cuda:<index>``."""

    @field_validator("custom")
    @classmethod
    def _custom_names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        taken = [n for n in v if n in ("attn", "mlp", "all")]
        if taken:
            raise ValueError(f"{taken[0]!r} is a built-in group; give the custom ablation another name")
        return v

    @field_validator("export")
    @classmethod
    def _export_names(cls, v: list[str]) -> list[str]:
        bad = [g for g in v if not g or any(c in g for c in "/\\ ")]
        if bad:
            raise ValueError(f"group {bad[0]!r} cannot name a directory (no spaces or slashes)")
        return v
