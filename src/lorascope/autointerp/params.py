"""``autointerp`` params: feature labelling."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from lorascope.llm.params import LlmClientSection
from lorascope.sections import PositiveInt


class AutointerpSection(LlmClientSection):
    """``autointerp``: label each feature from its max-activating contexts (paper prompt B.1)."""

    n_contexts: PositiveInt = 64
    """Top max-activating contexts shown per feature (the paper: 64)."""
    window_before: Annotated[int, Field(ge=0)] | None = None
    """Tokens shown before the activating token (null: all the contexts stage stored)."""
    window_after: Annotated[int, Field(ge=0)] | None = None
    """Tokens shown after the activating token (null: all the contexts stage stored)."""
    max_features: PositiveInt | None = None
    """Label only the first N features (cost control on a first pass); null for all."""
    detection_samples: Annotated[int, Field(ge=0)] = 10
    """Detection scoring: held-out activating windows (quantile samples, not shown in the prompt) and
    as many random non-activating windows per feature; 0 turns scoring off."""
    seed: int = 0
    """Seed of the detection windows' sampling and order."""
