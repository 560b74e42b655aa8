"""Prefix reuse: an ablation whose first changed layer is L leaves the hidden states entering layers
0..L unchanged. One unablated pass records, for every decoder layer, its input hidden state and the
keyword arguments the model handed it (rotary embeddings, causal mask, positions); an ablation then
runs only layers L.. from the recorded input, batched over ablations (the recorded batch of one
broadcasts over the rows)."""

from __future__ import annotations

from typing import Any

import torch


class LayerCache:
    """Inputs of every decoder layer of one sequence, and the tail of the model from any layer."""

    def __init__(self, causal_lm: Any) -> None:
        decoder = causal_lm.get_decoder()
        self.layers = list(decoder.layers)
        self.norm = decoder.norm
        self.decoder = decoder
        self.inputs: list[torch.Tensor] = []
        self.kwargs: list[dict[str, Any]] = []

    @torch.no_grad()
    def record(self, input_ids_1T: torch.Tensor) -> torch.Tensor:
        """Run the decoder once (as it is hooked now), keep each layer's inputs; returns the final
        normed hidden states ``[1, T, D]``."""
        self.inputs, self.kwargs = [None] * len(self.layers), [{} for _ in self.layers]  # type: ignore[list-item]

        def keep(i: int) -> Any:
            def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.inputs[i] = hidden
                self.kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

            return hook

        handles = [
            layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(self.layers)
        ]
        try:
            out = self.decoder(input_ids=input_ids_1T, use_cache=False).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        return out

    @torch.no_grad()
    def run_from(self, layer: int, batch: int) -> torch.Tensor:
        """Layers ``layer``.. and the final norm on the recorded input of ``layer``, for ``batch``
        rows (the hooks in place decide what each row ablates); returns ``[batch, T, D]``."""
        hidden = self.inputs[layer].expand(batch, -1, -1)
        for i in range(layer, len(self.layers)):
            hidden = self.layers[i](hidden, **self.kwargs[i])
            if isinstance(hidden, tuple):  # older transformers return (hidden_states, ...)
                hidden = hidden[0]
        return self.norm(hidden)
