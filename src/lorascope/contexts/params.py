"""``contexts`` params: max-activating contexts per feature."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from lorascope.extract.params import ExclusionSection
from lorascope.sections import Device, PositiveInt, Section


class ContextsSection(Section):
    """``contexts``: one streaming pass over a store keeping each feature's max-activating windows,
    quantile samples, random non-activating windows and summary statistics."""

    top_k: PositiveInt = 64
    """Max-activating tokens kept per feature (and per sign for signed sources such as the LoRA)."""
    window_before: Annotated[int, Field(ge=0)] = 32
    """Tokens of context kept before each selected token (windows never cross documents)."""
    window_after: Annotated[int, Field(ge=0)] = 8
    """Tokens of context kept after each selected token."""
    quantile_bins: PositiveInt = 10
    """Activation quantile bins for the non-top samples used in later scoring."""
    quantile_samples: Annotated[int, Field(ge=0)] = 5
    """Samples per quantile bin, drawn uniformly from the tokens that activate the feature."""
    random_samples: Annotated[int, Field(ge=0)] = 10
    """Random windows per feature centred on tokens that do not activate it."""
    active_threshold: Annotated[float, Field(ge=0)] = 0.0
    """A token activates a feature (sign) when sign x activation exceeds this; used for the top-k,
    the density statistic and the quantile / random samples."""
    feature_chunk: PositiveInt = 64
    """Features scored together per pass over a shard (bounds the working memory)."""
    seed: int = 0
    """Seed of the uniform samples."""
    device: Device = "auto"
    """Where the pass runs (SAE encoding included): ``auto`` (a CUDA GPU when present), ``cpu``,
    ``cuda`` or ``cuda:<index>``; shards are streamed to it one at a time."""
    exclude: ExclusionSection = Field(default_factory=ExclusionSection)
    """Tokens never selected as contexts nor counted in the feature statistics (they still show
    inside the windows of their neighbours)."""
