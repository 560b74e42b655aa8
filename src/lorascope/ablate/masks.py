"""Zero adapter components without touching weights: a forward hook on every ``lora_A`` multiplies
its output (``x . A``, what flows into ``lora_B``) by a per-batch-row keep factor, so one batch can
carry a different ablation in each row. ``keep_BK = None`` leaves the adapter as trained."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from lorascope.components import Component


class Masks:
    """Per-row component masks for a peft model; ``attach`` installs the hooks."""

    def __init__(self, comps: Sequence[Component]) -> None:
        self.comps = list(comps)
        self.keep_BK: torch.Tensor | None = None
        """``[batch, components]``: 1 keeps a component in that row, 0 zeroes it."""

    def rows(self, ablations: Sequence[Sequence[int]], device: Any) -> torch.Tensor:
        """Keep factors with one row per ablation (each a list of component indices)."""
        keep_BK = torch.ones(len(ablations), len(self.comps), device=device)
        for row, zeroed in enumerate(ablations):
            keep_BK[row, list(zeroed)] = 0
        return keep_BK

    @contextmanager
    def attach(self, peft_model: Any) -> Iterator[Masks]:
        base = peft_model.get_base_model()
        handles = []
        for k, comp in enumerate(self.comps):
            lora_A = base.get_submodule(comp.module).lora_A["default"]
            handles.append(lora_A.register_forward_hook(self._hook(k)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.keep_BK = None

    def _hook(self, k: int) -> Any:
        def apply(_m: Any, _args: Any, out: torch.Tensor) -> torch.Tensor | None:
            if self.keep_BK is None:
                return None
            return out * self.keep_BK[:, k].to(out.dtype).view(-1, *([1] * (out.dim() - 1)))

        return apply

    @contextmanager
    def ablating(self, keep_BK: torch.Tensor) -> Iterator[None]:
        """Apply ``keep_BK`` to the forward passes inside the block."""
        self.keep_BK = keep_BK
        try:
            yield
        finally:
            self.keep_BK = None
