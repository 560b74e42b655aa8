"""What an ablation zeroes: selectors over the adapter's components, and the standard sweeps.

A selector names a set of components (adapted modules, all their rank columns together):
``L<layer>.<type>`` one component, ``L<layer>`` every component of a layer, ``<type>`` (``q_proj`` ...)
every component of that type, ``attn`` (q, k, v, o), ``mlp`` (gate, up, down) or ``all``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from lorascope.components import Component, component_key, layer_key, parse_name
from lorascope.errors import LorascopeError
from lorascope.sections import LORA_TARGETS

GROUPS = {"attn": LORA_TARGETS[:4], "mlp": LORA_TARGETS[4:], "all": LORA_TARGETS}
_LAYER = re.compile(r"L(\d+)")


@dataclass(frozen=True)
class Ablation:
    """One ablation: a name, the sweep it belongs to, and the indices of the zeroed components."""

    name: str
    sweep: str
    """``components`` | ``layers`` | ``types`` | ``groups``."""
    components: tuple[int, ...]
    """Indices into the adapter's component list (component order)."""

    def start_layer(self, comps: Sequence[Component]) -> int:
        """The first layer the ablation changes: layers before it see unablated inputs."""
        return min(comps[i].layer for i in self.components)


def describe(comps: Sequence[Component]) -> str:
    """The valid selectors for ``comps``, in one line."""
    layers = sorted({c.layer for c in comps})
    kinds = [k for k in LORA_TARGETS if any(c.kind == k for c in comps)]
    span = layer_key(layers[0]) if len(layers) == 1 else f"{layer_key(layers[0])}..{layer_key(layers[-1])}"
    return (
        f"the adapter has layers {span} and types {', '.join(kinds)}; selectors: "
        f"L<layer>.<type>, L<layer>, <type>, attn, mlp, all"
    )


def select(selector: str, comps: Sequence[Component]) -> tuple[int, ...]:
    """Component indices named by ``selector``; an unknown name or an empty match is an error."""
    name = parse_name(selector)
    if name and name.index is None and name.sign is None and name.kind in LORA_TARGETS:
        match = [i for i, c in enumerate(comps) if c.layer == name.layer and c.kind == name.kind]
    elif m := _LAYER.fullmatch(selector):
        match = [i for i, c in enumerate(comps) if c.layer == int(m.group(1))]
    elif selector in LORA_TARGETS:
        match = [i for i, c in enumerate(comps) if c.kind == selector]
    elif selector in GROUPS:
        match = [i for i, c in enumerate(comps) if c.kind in GROUPS[selector]]
    else:
        raise LorascopeError(f"unknown component {selector!r} ({describe(comps)})")
    if not match:
        raise LorascopeError(f"{selector!r} matches no component of the adapter ({describe(comps)})")
    return tuple(match)


def select_all(selectors: Sequence[str], comps: Sequence[Component], where: str) -> tuple[int, ...]:
    """The union of several selectors; errors name ``where`` (the params key or CLI option)."""
    if not selectors:
        raise LorascopeError(f"{where}: no selectors given ({describe(comps)})")
    found: set[int] = set()
    for s in selectors:
        try:
            found.update(select(s, comps))
        except LorascopeError as e:
            raise LorascopeError(f"{where}: {e}") from None
    return tuple(sorted(found))


def sweeps(comps: Sequence[Component], which: Sequence[str], custom: dict[str, list[str]]) -> list[Ablation]:
    """The ablations of the requested sweeps, in a fixed order, plus the custom groups."""
    out: list[Ablation] = []
    layers = sorted({c.layer for c in comps})
    kinds = [k for k in LORA_TARGETS if any(c.kind == k for c in comps)]
    if "components" in which:
        out += [Ablation(component_key(c.layer, c.kind), "components", (i,)) for i, c in enumerate(comps)]
    if "layers" in which:
        out += [Ablation(layer_key(n), "layers", select(layer_key(n), comps)) for n in layers]
    if "types" in which:
        out += [Ablation(k, "types", select(k, comps)) for k in kinds]
    if "groups" in which:
        out += [
            Ablation(g, "groups", select(g, comps)) for g in GROUPS if any(c.kind in GROUPS[g] for c in comps)
        ]
    for name, selectors in custom.items():
        out.append(Ablation(name, "groups", select_all(selectors, comps, f"ablate.custom.{name}")))
    return out
