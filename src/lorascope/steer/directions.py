"""Steering directions as offsets of the adapter state (the ``x . A`` values flowing into ``lora_B``).

Adding ``v`` to a component's ``x . A`` adds ``scaling * v * B`` to its module's output, so:

* a LoRA component ``L<layer>.<type>`` is the unit vector on its column: steering by alpha adds
  ``alpha * typical * scaling * B`` (its B vector, as if its activation were alpha x its typical
  magnitude higher), typical = the RMS of its activation over the store;
* an SAE feature ``sae.<latent>`` is its decoder row (raw ``x . A`` units), which the adapter's B
  vectors map into the model; typical = its mean activation when it fires.

Typical magnitudes come from the contexts stage's feature tables (statistics over the whole store).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorascope.errors import LorascopeError

_SAE = re.compile(r"sae\.(\d+)")


@dataclass(frozen=True)
class Direction:
    """One direction: ``unit_C`` over the adapter state's columns and its typical magnitude."""

    name: str
    unit_C: torch.Tensor
    typical: float

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
    """Column ``name`` of the adapter state, scaled by its RMS over the store."""
    if name not in features:
        shown = ", ".join(features[:8]) + (f", ... ({len(features)} in all)" if len(features) > 8 else "")
        raise LorascopeError(
            f"steer.directions: unknown direction {name!r} (LoRA components: {shown}; or sae.<latent>)"
        )
    stats = _stats(stats_path)
    row = stats[(stats.feature_name.str.rstrip("+-") == name)].iloc[0]
    unit_C = torch.zeros(len(features))
    unit_C[features.index(name)] = 1.0
    return Direction(name, unit_C, math.sqrt(row["mean"] ** 2 + row["std"] ** 2))


def sae_direction(name: str, features: Sequence[str], sae_dir: Path, stats_path: Path) -> Direction:
    """Decoder row of SAE latent ``sae.<n>``, scaled by its mean activation when it fires."""
    from lorascope.sae.train import load

    m = _SAE.fullmatch(name)
    assert m is not None
    if not (sae_dir / "cfg.json").is_file():
        raise LorascopeError(f"{sae_dir}: no trained SAE (cfg.json missing); run `lorascope sae` first")
    sae, cfg = load(sae_dir)
    latent = int(m.group(1))
    if latent >= sae.d_sae:
        raise LorascopeError(f"steer.directions: {name!r}: the SAE has latents 0..{sae.d_sae - 1}")
    if list(cfg["components"]) != list(features):
        raise LorascopeError(
            f"{sae_dir}: the SAE was trained on other adapter components than models/lora has"
        )
    stats = _stats(stats_path)
    row = stats[stats.feature == latent].iloc[0]
    if row["nonzero_density"] == 0:
        raise LorascopeError(
            f"steer.directions: {name!r} never fires on the store (a dead latent); choose a live one"
        )
    return Direction(
        name, sae.W_dec_FD.detach()[latent].float().clone(), row["mean"] / row["nonzero_density"]
    )


def resolve(name: str, features: Sequence[str], root: Path) -> Direction:
    """The direction ``name`` names (``L<layer>.<type>`` or ``sae.<latent>``)."""
    contexts = root / "data" / "contexts"
    if _SAE.fullmatch(name):
        return sae_direction(name, features, root / "models" / "sae", contexts / "sae.features.parquet")
    return lora_direction(name, features, contexts / "lora.features.parquet")
