"""Ablating units inside the model, through ``interventions.State``'s hooks on every ``lora_A``.

* a component is ablated by zeroing its columns (``keep_BK``), as ``ablate`` does;
* an SAE latent is ablated by subtracting its decoded contribution ``f_j(t) * W_dec[j]`` from every
  component's columns (``offset_BTC``), with ``f_j(t)`` the latent's activation on the unablated adapter
  state of the same tokens. The approximation this states: a cross-layer latent reads every layer's
  components, so removing it from layer 0 changes what it would read at layer 1; its activation is kept
  at the unablated value (the SAE's splice and the attribution screen make the same choice).

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
from lorascope.interventions import State


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
