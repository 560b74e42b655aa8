"""``steer`` params: steering along adapter directions."""

from __future__ import annotations

from pydantic import Field, field_validator

from lorascope.evaluate.params import known_tasks
from lorascope.sections import Device, PositiveInt, Precision, Section


class SteerSection(Section):
    """``steer``: add alpha x typical magnitude of a direction to the adapter state while generating,
    and measure backtracking, length and accuracy."""

    directions: list[str] = Field(default_factory=list)
    """Directions to steer along: ``L<layer>.<type>`` (a LoRA component: its B vector; ``-`` appended:
    its negative side), ``sae.<latent>`` (a live SAE feature: its decoder vector mapped through the
    adapter's B vectors) or ``label:<regex>`` (the best labelled LoRA sign or SAE latent whose explanation
    matches, e.g. ``label:backtrack``). Empty, unknown, dead or unmatched: a one-line error."""
    alphas: list[float] = Field(default_factory=lambda: [0.0, 1.0, 10.0, 50.0, 100.0])
    """Multiples of the direction's typical magnitude to add (the paper needed >= 50)."""
    tasks: list[str] = Field(default_factory=lambda: ["math500"])
    """Benchmarks whose rows are the fixed prompt set (files from ``evaluate.data``, else the hub)."""
    limit: PositiveInt = 16
    """Prompts per task (the first N rows with an answer)."""
    max_new_tokens: PositiveInt = 1024
    """Thinking tokens per prompt (greedy; s1's budget: thinking cut here gets the forced
    ``Final Answer:``)."""
    answer_tokens: PositiveInt = 256
    """Tokens for the answer after the thinking (``<|im_start|>answer``), up to ``<|im_end|>``."""
    backtrack_words: list[str] = Field(default_factory=lambda: ["Wait", "Hmm"])
    """Words counted as backtracking (the paper author's: Wait, Hmm), reported as whole words
    (case-sensitive) per 1000 generated tokens and as the author's count (case-insensitive occurrences
    per 100 words, mean over prompts)."""
    batch_size: PositiveInt = 8
    """Prompts generated together."""
    precision: Precision = "auto"
    """Model compute dtype (``auto``: bfloat16 on a GPU that supports it, float32 otherwise)."""
    device: Device = "auto"
    """Where the model runs: ``auto`` (a CUDA GPU when present), ``cpu``, ``cuda`` or ``cuda:<index>``."""

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("the alpha list is empty; give at least one multiple (e.g. [0, 50])")
        return v

    @field_validator("tasks")
    @classmethod
    def _steer_tasks(cls, v: list[str]) -> list[str]:
        return known_tasks(v)

    @field_validator("backtrack_words")
    @classmethod
    def _words(cls, v: list[str]) -> list[str]:
        if not v or not all(w.strip() for w in v):
            raise ValueError("give at least one non-empty word")
        return v
