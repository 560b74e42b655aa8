"""Changing the adapter state inside the model: forward hooks on every ``lora_A`` (its output ``x . A`` is what
flows into ``lora_B``; weights are never touched, so this holds in bfloat16 too). One mechanism for ``ablate``
(zero components, a different ablation per batch row), ``steer`` (add a direction's offset) and ``attribute``
(zero components, subtract latents, record the state): ``keep_BK`` scales each component per row, then its
columns of ``offset_BTC`` are added; with neither set the model is the adapter as trained."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from lorascope.components import Component


def keep_rows(ablations: Sequence[Sequence[int]], components: int, device: Any) -> torch.Tensor:
    """``keep_BK``: one row per ablation (each a list of component indices to zero)."""
    keep_BK = torch.ones(len(ablations), components, device=device)
    for row, zeroed in enumerate(ablations):
        keep_BK[row, list(zeroed)] = 0
    return keep_BK


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
                out = out * self.keep_BK[:, k].to(out.device, out.dtype).view(-1, *([1] * (out.dim() - 1)))
            if self.offset_BTC is not None:
                out = out + self.offset_BTC[..., self.cols(k)].to(out.device, out.dtype)
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
        """The forwards inside the block scale each component by ``keep_BK[row, k]`` and then add its columns
        of ``offset_BTC`` (any shape that broadcasts to ``[B, T, C]``: ``[C]`` is one offset everywhere)."""
        self.keep_BK, self.offset_BTC = keep_BK, offset_BTC
        try:
            yield
        finally:
            self.keep_BK = self.offset_BTC = None
