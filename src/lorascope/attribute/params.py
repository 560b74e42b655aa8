"""``attribute`` params: screening every unit, exact ablations of the top ones, accuracy effects."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, field_validator

from lorascope.evaluate.params import known_tasks
from lorascope.sections import Device, PositiveInt, Precision, Section

UnitKind = Literal["components", "latents"]
_ALL_KINDS: tuple[UnitKind, ...] = ("components", "latents")


class AttributeSection(Section):
    """``attribute``: rank every adapter component and live SAE latent by the first-order change in
    cross-entropy its ablation causes (attribution patching), measure the top ones and a random control
    exactly, then generate the benchmark answers with the top ones ablated."""

    units: list[UnitKind] = Field(default_factory=lambda: list(_ALL_KINDS))
    """Unit kinds to screen: the adapter's components (each rank-r column group) and the SAE's live latents."""
    sequences: PositiveInt = 16
    """Training sequences sampled (with ``seed``) from the prepared data, as ``ablate`` samples them."""
    max_tokens: PositiveInt = 2048
    """Each sequence is cut to its first N tokens."""
    seed: int = 0
    """Seed of the sequence sample, the random control and the bootstrap."""
    screen_groups: PositiveInt = 8
    """Seeded random groups per unit kind whose gates share one path from as-trained to ablated (more
    groups: less interaction between units in each estimate, more passes)."""
    screen_steps: PositiveInt = 2
    """Midpoints per path (forward + backward passes per group and sequence)."""
    exact: NonNegativeInt = 32
    """Top units by screened ΔCE ablated exactly (ΔCE and KL), plus as many units drawn at random from
    the rest (the control)."""
    exact_components: bool = True
    """Also ablate every component exactly (for the screen's rank correlation over all components; one
    forward per component and sequence, as ``ablate``'s components sweep)."""
    generate: NonNegativeInt = 16
    """Top units by screened ΔCE whose ablation is generated on the benchmark questions (Δaccuracy)."""
    named: list[str] = Field(default_factory=list)
    """Units always measured and generated besides the top ones: ``L<layer>.<type>``, ``sae.<latent>`` or
    ``label:<regex>`` (the best labelled feature matching it, as ``steer`` picks it; e.g. ``label:Wait``)."""
    tasks: list[str] = Field(default_factory=lambda: ["aime24_nofigures", "math500"])
    """Benchmarks whose questions are generated (files from ``evaluate.data``, else the hub)."""
    limit: PositiveInt | None = None
    """Questions per task (the first N with an answer); null: all of them, as Table 1."""
    max_new_tokens: PositiveInt = 1024
    """Thinking tokens per question (greedy; s1's budget: thinking cut here gets the forced answer)."""
    answer_tokens: PositiveInt = 256
    """Tokens for the answer after the thinking (``<|im_start|>answer``), up to ``<|im_end|>``."""
    backtrack_words: list[str] = Field(default_factory=lambda: ["Wait", "Hmm"])
    """Words counted as backtracking (whole words, case-sensitive), per 1000 generated tokens."""
    bootstrap_iters: NonNegativeInt = 1000
    """Paired bootstrap resamples of the questions for each Δaccuracy's 95% CI (0: no CI)."""
    batch_size: PositiveInt = 8
    """Exact ablations per forward pass, and questions generated together."""
    precision: Precision = "auto"
    """Model compute dtype (``auto``: bfloat16 on a GPU that supports it, float32 otherwise); cross-entropy
    and KL are computed in float32."""
    device: Device = "auto"
    """Where the model runs: ``auto`` (a CUDA GPU when present), ``cpu``, ``cuda`` or ``cuda:<index>``."""

    @field_validator("units")
    @classmethod
    def _units(cls, v: list[UnitKind]) -> list[UnitKind]:
        if not v:
            raise ValueError("no unit kind; give components, latents or both")
        return v

    @field_validator("tasks")
    @classmethod
    def _attribute_tasks(cls, v: list[str]) -> list[str]:
        return known_tasks(v)
