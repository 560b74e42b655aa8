"""``report`` params: tables, figures and the feature dashboard."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lorascope.sections import PositiveInt, Section

DashboardSource = Literal["lora", "mlp", "sae"]
_ALL_DASHBOARD_SOURCES: tuple[DashboardSource, ...] = ("lora", "mlp", "sae")


class ReportSection(Section):
    """``report``: the paper's tables and figures, and the offline HTML feature dashboard."""

    dpi: PositiveInt = 150
    """Resolution of the PNG figures."""
    dashboard_sources: list[DashboardSource] = Field(default_factory=lambda: list(_ALL_DASHBOARD_SOURCES))
    """Feature sources shown in the dashboard (those with labels and contexts on disk)."""
    max_features: PositiveInt | None = None
    """Features per source in the dashboard (the first N by feature id); null for all."""
    contexts_per_feature: PositiveInt = 64
    """Max-activating contexts embedded per feature."""
    histogram_bins: PositiveInt = 40
    """Bins of each feature's activation histogram."""
    histogram_tokens: PositiveInt = 1_000_000
    """Tokens read from the start of the activation store for the histograms (and training samples)."""
    sample_tokens: PositiveInt = 1024
    """Most tokens of the training sample shown with all of a feature's activations (centred on the
    feature's strongest token when the document is longer)."""
