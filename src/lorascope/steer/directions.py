"""Steering directions as offsets of the adapter state (the ``x . A`` values flowing into ``lora_B``), and
the hooks that add one while the model runs (``steered``: a forward hook on every ``lora_A`` adds that
component's columns of the offset at every position, prompt and generated tokens; zero changes nothing).

Adding ``v`` to a component's ``x . A`` adds ``scaling * v * B`` to its module's output, so:

* a LoRA component ``L<layer>.<type>`` is the unit vector on its column: steering by alpha adds
  ``alpha * typical * scaling * B`` (its B vector, as if its activation were alpha x its typical
  magnitude higher), typical = the RMS of its activation over the store;
* an SAE feature ``sae.<latent>`` is its decoder row (raw ``x . A`` units), which the adapter's B
  vectors map into the model; typical = its mean activation when it fires.

A LoRA name may carry a sign (``L3.q_proj-``: the negative side of the direction, steered as ``-unit``).
``label:<regex>`` picks the direction from the labels instead of naming it: among the ok labels of
``data/interp/lora.parquet`` and ``data/interp/sae.parquet`` (live SAE latents only) whose explanation
matches the regex (case-insensitive ``re.search``), the one with the highest detection balanced accuracy
(then the lowest class, SAE before LoRA, the lowest id); so a profile names what to steer (e.g. backtracking)
rather than a placeholder component. A name that does not exist, a dead latent, a bad regex or an empty list
is a one-line error; a selector that no label matches (``NoLabelMatch``) is a finding about the labels, which
the stage records and steers nothing for: nothing is ever steered along a stand-in.

Typical magnitudes come from the contexts stage's feature tables (statistics over the whole store).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorascope import paths
from lorascope.autointerp.labels import LABEL
from lorascope.components import Component, parse_latent
from lorascope.errors import LorascopeError


@dataclass(frozen=True)
class Direction:
    """One direction: ``unit_C`` over the adapter state's columns and its typical magnitude."""

    name: str
    unit_C: torch.Tensor
    typical: float
    selector: str | None = None
    """The ``label:<regex>`` that chose this direction (None when it was named)."""

    def offset(self, alpha: float) -> torch.Tensor:
        """What steering by ``alpha`` adds to the adapter state of every token."""
        return self.unit_C * (alpha * self.typical)


def _stats(path: Path) -> Any:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise LorascopeError(
            f"{path}: feature statistics not found; run `lorascope contexts` (or `dvc repro`) first"
        )
    return pq.read_table(path).to_pandas()


def lora_direction(name: str, features: Sequence[str], stats_path: Path) -> Direction:
    """Column ``name`` of the adapter state (``-unit`` for a name ending in ``-``), scaled by its RMS over
    the store."""
    sign = -1.0 if name.endswith("-") else 1.0
    name = name[:-1] if name[-1:] in "+-" else name
    if name not in features:
        shown = ", ".join(features[:8]) + (f", ... ({len(features)} in all)" if len(features) > 8 else "")
        raise LorascopeError(
            f"steer.directions: unknown direction {name!r} (LoRA components: {shown}; or sae.<latent>)"
        )
    stats = _stats(stats_path)
    rows = stats[(stats.feature_name.str.rstrip("+-") == name)]
    if rows.empty:
        raise LorascopeError(
            f"{stats_path}: no statistics for {name!r}; the contexts are older than the adapter, re-run them"
        )
    row = rows.iloc[0]
    unit_C = torch.zeros(len(features))
    unit_C[features.index(name)] = sign
    label = name + ("-" if sign < 0 else "")
    return Direction(label, unit_C, math.sqrt(row["mean"] ** 2 + row["std"] ** 2))


def sae_direction(name: str, features: Sequence[str], sae_dir: Path, stats_path: Path) -> Direction:
    """Decoder row of SAE latent ``sae.<n>``, scaled by its mean activation when it fires."""
    from lorascope.sae.load import ALIVE, alive_latents, load_sae

    latent = parse_latent(name)
    assert latent is not None
    sae, cfg = load_sae(sae_dir)
    if latent >= sae.d_sae:
        raise LorascopeError(f"steer.directions: {name!r}: the SAE has latents 0..{sae.d_sae - 1}")
    if list(cfg["components"]) != list(features):
        raise LorascopeError(
            f"{sae_dir}: the SAE was trained on other adapter components than models/lora has"
        )
    if latent not in alive_latents(sae_dir, sae.d_sae):
        raise LorascopeError(
            f"steer.directions: {name!r} is a dead latent (not in {sae_dir}/{ALIVE}); choose a live one"
        )
    stats = _stats(stats_path)
    rows = stats[stats.feature == latent]
    if rows.empty:
        raise LorascopeError(
            f"{stats_path}: no statistics for {name!r}; re-run `lorascope contexts --source sae`"
        )
    row = rows.iloc[0]
    if row["nonzero_density"] == 0:
        raise LorascopeError(
            f"steer.directions: {name!r} never fires on the store (a dead latent); choose a live one"
        )
    return Direction(
        name, sae.W_dec_FD.detach()[latent].float().clone(), row["mean"] / row["nonzero_density"]
    )


def resolve(name: str, features: Sequence[str], root: Path) -> Direction:
    """The direction ``name`` names (``L<layer>.<type>[+-]``, ``sae.<latent>`` or ``label:<regex>``)."""
    from dataclasses import replace

    if name.startswith(LABEL):
        from lorascope.autointerp.labels import select_by_label

        return replace(resolve(select_by_label(name, root), features, root), selector=name)
    if parse_latent(name) is not None:
        return sae_direction(name, features, root / paths.SAE, root / paths.features("sae"))
    return lora_direction(name, features, root / paths.features("lora"))


@contextmanager
def steered(peft_model: Any, comps: Sequence[Component], offset_C: torch.Tensor) -> Iterator[None]:
    """Add ``offset_C`` (one value per adapter-state column, component order) to every ``x . A``."""
    from lorascope.interventions import State

    state = State(peft_model, comps)
    with state.attach(), state.changed(None, offset_C):
        yield
