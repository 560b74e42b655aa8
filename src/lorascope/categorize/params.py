"""``categorize`` params: feature categorization."""

from __future__ import annotations

from pydantic import Field, model_validator

from lorascope.llm.params import LlmClientSection
from lorascope.sections import Device, PositiveInt, Section


class CategorizeSection(Section):
    """``categorize``: generate functional categories (B.2a), then assign each feature one (B.2b)."""

    assign: LlmClientSection = Field(default_factory=LlmClientSection)
    """Client for the per-feature assignment (B.2b; the paper: gpt-5-mini)."""
    generate: LlmClientSection = Field(
        default_factory=lambda: LlmClientSection(backend="anthropic", model="claude-opus-4-1")
    )
    """Client for category generation (B.2a; the paper: Claude Opus 4.1)."""
    min_categories: PositiveInt = 5
    """Fewest categories the generation prompt asks for (the paper: 5)."""
    max_categories: PositiveInt = 8
    """Most categories the generation prompt asks for (the paper: 8)."""
    sample_size: PositiveInt = 200
    """Explanations shown to category generation: an equal number of LoRA and MLP explanations
    (``sample_size // 2`` each, at most the smaller set; sampled with ``seed``), as in the paper."""
    n_examples: PositiveInt = 5
    """Max-activating contexts shown with each feature in the assignment prompt."""
    sae_subcategories: bool = True
    """Also generate subcategories within each category for SAE features and assign them."""
    density_tokens: PositiveInt = 100_000
    """Tokens of each activation store summed for the Figure 2 densities: whole documents drawn at random
    (``seed``) up to this many, less the tokens the SAE's exclusion policy (``sae.exclude``) leaves out."""
    device: Device = "auto"
    """Where the Figure 2 density pass sums the stores: ``auto`` (a CUDA GPU when present), ``cpu``,
    ``cuda`` or ``cuda:<index>``."""
    seed: int = 0
    """Seed of the explanation sample and of the Figure 2 document sample."""

    @model_validator(mode="after")
    def _range(self) -> CategorizeSection:
        if self.min_categories > self.max_categories:
            raise ValueError(
                f"min_categories ({self.min_categories}) must be <= max_categories ({self.max_categories})"
            )
        return self
