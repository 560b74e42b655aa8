"""Ablating units inside the model, through forward hooks on every ``lora_A`` (its output ``x . A`` is the
adapter state flowing into ``lora_B``; weights are never touched, so this holds in bfloat16 too).

* a component is ablated by zeroing its columns (``keep_BK``), as ``ablate`` does;
* an SAE latent is ablated by subtracting its decoded contribution ``f_j(t) * W_dec[j]`` from every
  component's columns (``offset_BTC``), with ``f_j(t)`` the latent's activation on the unablated adapter
  state of the same tokens. The approximation this states: a cross-layer latent reads every layer's
  components, so removing it from layer 0 changes what it would read at layer 1; its activation is kept
  at the unablated value (the SAE's splice and the attribution screen make the same choice).

``State`` batches different ablations in one forward (a row each) and records the unablated state;
``ablated_generation`` ablates one unit while the model generates: for a latent, every forward the
generation makes (the prompt, then each new token) first runs the unablated decoder on the same tokens
with its own key/value cache, so each position's latent activation is the unablated one on the text
generated so far.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from lorascope.attribute.units import Unit
from lorascope.components import Component


class State:
    """Hooks on every ``lora_A`` of a peft model: record the adapter state, or change it per batch row."""

    def __init__(self, peft_model: Any, comps: Sequence[Component]) -> None:
        self.base = peft_model.get_base_model()
        self.comps = list(comps)
        self.bounds = [0]
        for c in self.comps:
            self.bounds.append(self.bounds[-1] + c.width)
        self.keep_BK: torch.Tensor | None = None
        self.offset_BTC: torch.Tensor | None = None
        self.recorded: list[torch.Tensor] | None = None

    @property
    def width(self) -> int:
        return self.bounds[-1]

    def cols(self, k: int) -> slice:
        return slice(self.bounds[k], self.bounds[k + 1])

    @contextmanager
    def attach(self) -> Iterator[State]:
        handles = [
            self.base.get_submodule(c.module).lora_A["default"].register_forward_hook(self._hook(k))
            for k, c in enumerate(self.comps)
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.keep_BK = self.offset_BTC = self.recorded = None

    def _hook(self, k: int) -> Any:
        def apply(_m: Any, _args: Any, out: torch.Tensor) -> torch.Tensor | None:
            if self.recorded is not None:
                self.recorded[k] = out
            if self.keep_BK is None and self.offset_BTC is None:
                return None
            if self.keep_BK is not None:
                out = out * self.keep_BK[:, k].to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
            if self.offset_BTC is not None:
                out = out + self.offset_BTC[..., self.cols(k)].to(out.dtype)
            return out

        return apply

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Each component's ``lora_A`` output of the forwards inside the block (the last one's)."""
        self.recorded = [torch.empty(0)] * len(self.comps)
        try:
            yield self.recorded
        finally:
            self.recorded = None

    def gather(self, recorded: list[torch.Tensor]) -> torch.Tensor:
        """The recorded outputs as one adapter state ``[B, T, C]`` in component order."""
        return torch.cat(recorded, dim=-1)

    @contextmanager
    def changed(self, keep_BK: torch.Tensor | None, offset_BTC: torch.Tensor | None) -> Iterator[None]:
        self.keep_BK, self.offset_BTC = keep_BK, offset_BTC
        try:
            yield
        finally:
            self.keep_BK = self.offset_BTC = None


def latent_offset(sae: Any, latent: int, acts_BTC: torch.Tensor) -> torch.Tensor:
    """``-f_j(t) * W_dec[j]``: what removes latent ``j``'s decoded contribution from each token's state."""
    f_BT = sae.encode(acts_BTC.reshape(-1, acts_BTC.shape[-1]).float())[:, latent].view(acts_BTC.shape[:-1])
    return -f_BT[..., None] * sae.W_dec_FD[latent].float()


@contextmanager
def ablated_generation(
    peft_model: Any, comps: Sequence[Component], unit: Unit, sae: Any = None
) -> Iterator[None]:
    """While the block generates, ``unit`` is ablated (see the module docstring)."""
    state = State(peft_model, comps)
    with state.attach():
        if unit.kind == "component":
            keep_1K = torch.ones(1, len(comps))
            keep_1K[0, unit.index] = 0
            with state.changed(keep_1K, None):
                yield
            return
        decoder = state.base.get_decoder()
        import inspect

        # the cache's keyword (``cache`` in recent transformers, ``past_key_values`` before)
        key = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        clean: dict[str, Any] = {}

        def before(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            from transformers import DynamicCache

            cache = kwargs.get(key)
            if cache is None or cache.get_seq_length() == 0:  # a new sequence: a new unablated cache
                clean["cache"] = DynamicCache(config=state.base.config)
            state.keep_BK = state.offset_BTC = None
            passed = {
                k: kwargs[k] for k in ("attention_mask", "position_ids", "cache_position") if k in kwargs
            }
            with torch.no_grad(), state.recording() as recorded:
                decoder(input_ids=kwargs["input_ids"], **passed, use_cache=cache is not None,
                        **{key: clean["cache"] if cache is not None else None})  # fmt: skip
                acts_BTC = state.gather(recorded)
            state.offset_BTC = latent_offset(sae, unit.index, acts_BTC)

        handle = state.base.register_forward_pre_hook(before, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
