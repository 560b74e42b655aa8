"""``prepare`` params: the training data (s1K-1.1, a file or the synthetic organism)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from lorascope.sections import Fraction, PositiveInt, Section


class SyntheticData(Section):
    """The offline generator of s1K-1.1-schema reasoning traces and benchmark-shaped eval rows."""

    family: Literal["organism", "word_problems"] = "organism"
    """``organism``: the model organism's digit-sum problems with worked, partly careful ("Wait,")
    traces, for the base the tiny profile pretrains (``lorascope.organism``);
    ``word_problems``: multi-step word problems with R1-style traces (format only: no model learns
    them)."""
    n_train: PositiveInt = 256
    """Training rows (distinct questions, none of them an evaluation question)."""
    n_eval: PositiveInt = 64
    """Held-out eval rows per benchmark shape (integer answer, LaTeX answer, 4-way choice)."""
    seed: int = 0
    """Generator seed: the same seed gives byte-identical rows."""


class PrepareSection(Section):
    """``prepare``: load the training traces, format them as s1 did, tokenize, validate."""

    source: str = "hub:simplescaling/s1K-1.1"
    """``hub:<dataset id>`` (datasets.load_dataset), a local .jsonl/.json/.parquet file in the
    s1K-1.1 schema, or ``synthetic``."""
    split: str = "train"
    """Split to read from a hub dataset."""
    revision: str | None = None
    """Hub dataset revision to pin (None: the default branch)."""
    block_size: PositiveInt = 20000
    """Maximum tokens per training sequence; longer sequences are truncated and counted."""
    max_truncated_fraction: Fraction = 0.05
    """Validation fails when more than this fraction of rows exceeds ``block_size``."""
    synthetic: SyntheticData = Field(default_factory=SyntheticData)
    """Generator settings, used when ``source`` is ``synthetic`` (eval rows are always written)."""

    @field_validator("source")
    def _source_form(cls, v: str) -> str:
        if v == "synthetic" or (v.startswith("hub:") and len(v) > 4):
            return v
        if Path(v).suffix.lower() in (".jsonl", ".json", ".parquet"):
            return v
        raise ValueError(
            f"expected 'synthetic', 'hub:<dataset id>' or a .jsonl/.json/.parquet path, got {v!r}"
        )

    @property
    def local_file(self) -> Path | None:
        """The dataset file when ``source`` names one (not ``synthetic``, not ``hub:``)."""
        if self.source == "synthetic" or self.source.startswith("hub:"):
            return None
        return Path(self.source).expanduser().resolve()
