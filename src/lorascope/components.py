"""The shared vocabulary of features: adapter components and MLP neurons in the fixed order of the DESIGN
contract, and how every feature, layer and SAE latent is named (one builder and one parser each).

Order: layer-major, then ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``. A rank-1
component is one scalar per token named ``L{layer}.{kind}``; rank r gives r scalars named
``L{layer}.{kind}.{i}``. The MLP baseline names neuron i of layer l ``L{l}.mlp.{i}``. A layer is ``L{layer}``;
SAE latent i is ``sae.{i}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lorascope.errors import LorascopeError
from lorascope.sections import LORA_TARGETS

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PEFT_PREFIX = "base_model.model."
_NAME = re.compile(r"^L(?P<layer>\d+)\.(?P<kind>[A-Za-z_]+?)(?:\.(?P<index>\d+))?(?P<sign>[+-])?$")
_LATENT = re.compile(r"sae\.(\d+)")


def layer_key(layer: int) -> str:
    """``L3``: a layer, as ablation groups and figure rows name it."""
    return f"L{layer}"


def component_key(layer: int, kind: str) -> str:
    """``L3.q_proj``: a component (all its scalars), as ablations and the adapter's vectors name it."""
    return f"{layer_key(layer)}.{kind}"


def latent_name(latent: int) -> str:
    """``sae.42``: an SAE latent as a feature."""
    return f"sae.{latent}"


def parse_latent(name: str) -> int | None:
    """The latent of ``sae.<n>``; None when ``name`` is not an SAE latent."""
    m = _LATENT.fullmatch(name)
    return None if m is None else int(m.group(1))


@dataclass(frozen=True)
class Name:
    """A parsed feature name ``L{layer}.{kind}[.{index}][{sign}]``: ``L3.q_proj``, ``L3.q_proj.0``
    (rank > 1), ``L3.mlp.17`` (an MLP neuron), ``L3.q_proj+`` (one sign of a direction)."""

    layer: int
    kind: str
    index: int | None = None
    sign: str | None = None


def parse_name(name: str) -> Name | None:
    """The parts of a component or feature name; None when ``name`` is not one (an SAE latent)."""
    m = _NAME.match(name)
    if m is None:
        return None
    index = None if m["index"] is None else int(m["index"])
    return Name(int(m["layer"]), m["kind"], index, m["sign"])


@dataclass(frozen=True)
class Component:
    """One adapted (or probed) module and the scalars recorded from it per token."""

    layer: int
    kind: str
    """Projection name (``q_proj`` ...) or ``mlp`` for the neuron baseline."""
    module: str
    """Module path inside the base ``*ForCausalLM`` (e.g. ``model.layers.3.self_attn.q_proj``)."""
    width: int
    """Scalars per token: the adapter rank, or the number of MLP neurons."""

    def names(self) -> list[str]:
        """Feature names of this component's scalars, in storage order."""
        stem = component_key(self.layer, self.kind)
        if self.kind != "mlp" and self.width == 1:
            return [stem]
        return [f"{stem}.{i}" for i in range(self.width)]


def layer_of(module_name: str) -> int:
    """Decoder layer index in a module path (``...layers.12.mlp.up_proj`` -> 12)."""
    match = _LAYER.search(module_name)
    if match is None:
        raise LorascopeError(f"module {module_name!r} is not inside a decoder layer")
    return int(match.group(1))


def lora_components(peft_model: Any) -> list[Component]:
    """Every LoRA-adapted linear of ``peft_model`` (adapter ``default``) in component order."""
    import torch
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        kind = name.rsplit(".", 1)[-1]
        if kind not in LORA_TARGETS:
            raise LorascopeError(f"adapter targets {name!r}; expected only {', '.join(LORA_TARGETS)}")
        weight = module.lora_A["default"].weight
        assert isinstance(weight, torch.Tensor)
        rank = weight.shape[0]
        found.append(Component(layer_of(name), kind, name.removeprefix(_PEFT_PREFIX), rank))
    if not found:
        raise LorascopeError("the adapter has no LoRA layers")
    return sorted(found, key=lambda c: (c.layer, LORA_TARGETS.index(c.kind)))


def mlp_components(model: Any, neurons: int) -> list[Component]:
    """The first ``neurons`` MLP hidden units of every layer (the input of ``down_proj``)."""
    layers = model.get_decoder().layers
    width = layers[0].mlp.down_proj.in_features
    if neurons > width:
        raise LorascopeError(f"extract.mlp_neurons: the MLP has {width} neurons per layer, got {neurons}")
    return [Component(i, "mlp", f"model.layers.{i}.mlp.down_proj", neurons) for i in range(len(layers))]


def feature_names(components: list[Component]) -> list[str]:
    """All scalar names in storage order."""
    return [n for c in components for n in c.names()]
