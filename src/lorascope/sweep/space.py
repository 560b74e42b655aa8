"""Search spaces (``pipelines/sweeps/<target>.yaml``): what to vary, what to optimise, how to prune.

A space names params by their dotted key (``finetune.lora.r``) with a distribution each; ``fixed``
overrides apply to every trial (e.g. fewer epochs). Each trial's overrides are merged into the base
params and validated like any params file, so a sweep cannot run a configuration ``dvc repro`` would
reject.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorascope.config import Params, deep_merge, describe_error, read_yaml_mapping, validate_params
from lorascope.errors import LorascopeError

Target = Literal["lora", "sae"]
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "lora": ("heldout_loss",),
    "sae": ("fvu", "kl_lora_spliced"),
}
"""Objectives each target can report (all minimised)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Dist(Strict):
    """One parameter's distribution: ``choices`` (categorical) or ``low``/``high`` (+ ``log``, ``step``)."""

    choices: list[Any] | None = None
    """Categorical values."""
    low: float | None = None
    """Lower bound of a numeric range."""
    high: float | None = None
    """Upper bound of a numeric range."""
    log: bool = False
    """Sample the range log-uniformly."""
    int: bool = False
    """Integer range."""
    step: float | None = None
    """Grid step of a numeric range."""

    @model_validator(mode="after")
    def _one_kind(self) -> Dist:
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either choices or low and high")
        if self.choices is not None and not self.choices:
            raise ValueError("choices must not be empty")
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self

    def bounds(self) -> tuple[float, float]:
        """``(low, high)`` of a numeric range (``_one_kind``: every distribution without choices has both)."""
        if self.low is None or self.high is None:
            raise ValueError("a categorical distribution has no low and high")
        return self.low, self.high


class Pruner(Strict):
    """Optuna pruner settings."""

    type: Literal["median", "percentile", "hyperband", "none"] = "median"
    """Which pruner."""
    n_startup_trials: Annotated[int, Field(ge=0)] = 2
    """Trials that finish before any pruning."""
    n_warmup_steps: Annotated[int, Field(ge=0)] = 0
    """Reports of a trial before it may be pruned."""
    percentile: Annotated[float, Field(gt=0, lt=100)] = 50.0
    """``percentile`` pruner only."""


class Space(Strict):
    """A sweep definition."""

    target: Target
    """``lora`` (the finetune stage's LoRA) or ``sae``."""
    objectives: list[str]
    """Values to minimise; two make a multi-objective study (no pruning then)."""
    params: dict[str, Dist]
    """Dotted params key -> distribution."""
    fixed: dict[str, Any] = Field(default_factory=dict)
    """Params overrides for every trial (nested mapping, like params.yaml)."""
    n_trials: Annotated[int, Field(gt=0)] = 20
    """Trials in the study across all processes (finished, pruned or failed)."""
    seed: int = 0
    """Sampler seed."""
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    """``lora``: prepared rows held out (by a hash of their id) for the held-out loss."""
    report_every: Annotated[int, Field(gt=0)] = 20
    """``sae``: report the training loss to the pruner every N steps."""
    pruner: Pruner = Field(default_factory=Pruner)
    """Pruning of unpromising trials from intermediate reports."""

    @model_validator(mode="after")
    def _objectives_known(self) -> Space:
        known = OBJECTIVES[self.target]
        bad = [o for o in self.objectives if o not in known]
        if not self.objectives or bad:
            raise ValueError(f"objectives must be a non-empty subset of {list(known)}, got {self.objectives}")
        return self


def load_space(path: Path, base: Params) -> Space:
    """Read and check a space file against the params it will override."""
    data = read_yaml_mapping(path)
    try:
        space = Space.model_validate(data)
    except ValidationError as e:
        raise LorascopeError(
            f"{path}: {'; '.join(describe_error(err) for err in e.errors(include_url=False))}"
        ) from None
    for key, dist in space.params.items():  # every key must name a param and accept its values
        sample = dist.choices[0] if dist.choices is not None else dist.bounds()[0]
        overrides(base, {key: int(sample) if dist.int else sample}, space.fixed, f"{path}: params.{key}")
    return space


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def overrides(base: Params, values: dict[str, Any], fixed: dict[str, Any], source: str) -> Params:
    """``base`` with ``fixed`` and the dotted ``values`` merged in, validated."""
    merged = deep_merge(deep_merge(base.model_dump(mode="json"), fixed), nested(values))
    return validate_params(merged, source)


def suggest(trial: Any, space: Space) -> dict[str, Any]:
    """Draw one value per param from ``trial``."""
    values = {}
    for key, d in space.params.items():
        if d.choices is not None:
            values[key] = trial.suggest_categorical(key, d.choices)
        elif d.int:
            low, high = d.bounds()
            values[key] = trial.suggest_int(key, int(low), int(high), log=d.log, step=int(d.step or 1))
        else:
            values[key] = trial.suggest_float(key, d.low, d.high, log=d.log, step=d.step)
    return values


def dump_overrides(values: dict[str, Any]) -> str:
    """YAML of a nested override mapping."""
    return yaml.safe_dump(nested(values), sort_keys=False)
