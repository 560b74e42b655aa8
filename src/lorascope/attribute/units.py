"""The units ``attribute`` ranks: adapter components (a component's columns of the adapter state, i.e. its
rank-r ``x . A`` values) and live SAE latents (a latent's decoded contribution to every component), and
the named ones a profile asks for (``L<layer>.<type>``, ``sae.<latent>``, ``label:<regex>``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lorascope.components import Component, component_key, latent_name, parse_latent
from lorascope.errors import LorascopeError

LABEL = "label:"


@dataclass(frozen=True)
class Unit:
    """One unit: ``index`` is the component's position in component order, or the latent's id."""

    name: str
    kind: Literal["component", "latent"]
    index: int


def component_units(comps: Sequence[Component]) -> list[Unit]:
    return [Unit(component_key(c.layer, c.kind), "component", k) for k, c in enumerate(comps)]


def latent_units(alive: Sequence[int]) -> list[Unit]:
    return [Unit(latent_name(j), "latent", j) for j in alive]


def resolve(name: str, units: Sequence[Unit], root: Path, key: str = "attribute.named") -> Unit:
    """The unit ``name`` names among ``units``; a ``label:<regex>`` picks the best labelled feature whose
    explanation matches (a LoRA direction's sign names its component). One-line errors name ``key``
    (``NoLabelMatch`` when no label matches: the caller decides whether that is an error)."""
    if name.startswith(LABEL):
        from lorascope.autointerp.labels import select_by_label

        chosen = select_by_label(name, root, key)
        return resolve(chosen.rstrip("+-"), units, root, key)
    found = next((u for u in units if u.name == name), None)
    if found is not None:
        return found
    if parse_latent(name) is not None:
        if not any(u.kind == "latent" for u in units):
            raise LorascopeError(
                f"{key}: {name!r} is an SAE latent, but no latents are screened (attribute.units)"
            )
        raise LorascopeError(f"{key}: {name!r} is not a live SAE latent (models/sae/alive.json)")
    shown = ", ".join(u.name for u in units if u.kind == "component")
    raise LorascopeError(
        f"{key}: unknown unit {name!r} (components: {shown}; or sae.<latent>, label:<regex>)"
    )
