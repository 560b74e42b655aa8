"""Hooks that write every component's per-token scalars into one ``[batch, seq, C]`` buffer.

Three readings, one buffer layout (columns in component order):

* ``merged``: the adapter is folded into the weights; a forward *pre*-hook on each adapted linear
  projects the linear's real input on ``lora_A`` (``x @ A.T``, accumulated in float32 whatever the
  model's dtype), so the inputs are whatever the model feeds the module (post-norm for q/k/v and
  gate/up, attention output for o, SwiGLU product for down).
* ``lora_a``: the unmerged peft model; a forward hook on each ``lora_A`` module reads its output
  (peft keeps ``lora_A`` in float32 and casts the input to it, so this is float32 too).
* ``mlp``: a pre-hook on each ``down_proj`` of the base model keeps the first N input neurons.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lorascope.components import Component

SHARED_INPUT = {"q_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj")}
"""Projections of a Qwen2 / Llama layer that read the very same input tensor, led by the first."""

Reader = Callable[[Any, tuple[Any, ...], Any], Any]
"""(module, inputs, output or None) -> values ``[batch, seq, width]``."""


class Recorder:
    """Collects the recorded scalars of one forward pass; ``attach`` installs the hooks."""

    def __init__(self, components: list[Component], projections: dict[str, Any] | None = None) -> None:
        self.components = components
        self.projections = projections or {}
        """``merged`` only: module path -> its ``lora_A`` weight ``[r, in_features]``."""
        self.width = sum(c.width for c in components)
        self.buffer_BSC: Any = None
        self._shared: tuple[Any, list[str]] | None = None
        """The input the last group leader projected and the modules it covered."""

    def begin(self, batch: int, seq: int, device: Any) -> None:
        """Allocate the buffer for the next forward pass (fp32: the store casts afterwards)."""
        import torch

        self.buffer_BSC = torch.empty(batch, seq, self.width, dtype=torch.float32, device=device)
        self._shared = None

    def _write(self, start: int, width: int, values_BSW: Any) -> None:
        self.buffer_BSC[..., start : start + width] = values_BSW

    @contextmanager
    def attach(self, model: Any, method: str) -> Iterator[Recorder]:
        """Hook ``model`` (a ``*ForCausalLM``, merged or peft-wrapped) for ``method``:
        ``merged`` | ``lora_a`` | ``mlp``."""
        handles = []
        start = 0
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        starts = {}
        for comp in self.components:
            starts[comp.module] = (start, comp.width)
            start += comp.width
        for comp in self.components:
            module = base.get_submodule(comp.module)
            handles.append(self._hook(module, comp.module, method, *starts[comp.module], starts))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._shared = None

    def _hook(
        self, module: Any, name: str, method: str, start: int, width: int, starts: dict[str, tuple[int, int]]
    ) -> Any:
        if method == "merged":
            import torch

            A_rI = self.projections[name]
            # Projections in float32 (A's dtype) whatever the model's dtype: a bf16 product would round
            # x . A. In reduced precision the projections that read the same tensor (q/k/v, gate/up:
            # SHARED_INPUT) are done by the first one as one stacked product (the input is read and cast
            # once); the others find their input already projected and skip (and project it themselves
            # if it differs).
            prefix, _, kind = name.rpartition(".")
            group = [f"{prefix}.{k}" for k in SHARED_INPUT.get(kind, ()) if f"{prefix}.{k}" in starts]
            stacked = torch.cat([self.projections[m] for m in group]) if len(group) > 1 else A_rI
            spans = [starts[m] for m in group] if len(group) > 1 else [(start, width)]

            def project(_m: Any, args: tuple[Any, ...]) -> None:
                x = args[0]
                if x.dtype == A_rI.dtype:  # float32: no cast to share; the product lora_A itself computes
                    self._write(start, width, x @ A_rI.T)
                    return
                if self._shared is not None and self._shared[0] is x and name in self._shared[1]:
                    return  # projected with the group's first module
                out = x.to(stacked.dtype) @ stacked.T
                col = 0
                for s, w in spans:
                    self._write(s, w, out[..., col : col + w])
                    col += w
                self._shared = (x, group) if len(group) > 1 else None

            return module.register_forward_pre_hook(project)
        if method == "lora_a":

            def read(_m: Any, _args: tuple[Any, ...], out: Any) -> None:
                self._write(start, width, out)

            return module.lora_A["default"].register_forward_hook(read)
        if method == "mlp":

            def neurons(_m: Any, args: tuple[Any, ...]) -> None:
                self._write(start, width, args[0][..., :width])

            return module.register_forward_pre_hook(neurons)
        raise ValueError(f"unknown extraction method {method!r}")


def merge_for_recording(peft_model: Any, components: list[Component]) -> tuple[Any, Recorder]:
    """Fold the adapter into its base (peft's ``merge_and_unload``) and return the merged model with the
    ``merged`` Recorder: each component's ``lora_A`` row, kept in float32 before merging, projects the merged
    module's real input."""
    base = peft_model.get_base_model()
    projections = {
        c.module: base.get_submodule(c.module).lora_A["default"].weight.detach().float().clone()
        for c in components
    }
    return peft_model.merge_and_unload(), Recorder(components, projections)
