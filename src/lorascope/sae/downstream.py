"""Downstream effect of the SAE: splice its reconstruction of each token's adapter state in place of
the recorded ``x . A`` values and compare next-token distributions.

For each held-out sequence: P_lora (the adapter as trained), P_spliced (every ``lora_A`` output
replaced by the SAE reconstruction of that token's stored adapter state) and P_base (adapter off).
Reported: mean per-token KL(P_lora || P_spliced), KL(P_lora || P_base) and the fraction of the LoRA's
effect recovered, 1 - KL(P_lora || P_spliced) / KL(P_lora || P_base).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lorascope.divergence import kl_per_token
from lorascope.extract.store import Store


@contextmanager
def spliced(model: Any, store: Store, values_TC: torch.Tensor):
    """Replace every adapter component's ``lora_A`` output by the matching columns of ``values_TC``."""
    base = model.get_base_model()
    handles, start = [], 0
    for m in store.index["modules"]:
        cols = values_TC[:, start : start + m["width"]]
        start += m["width"]

        def replace(_mod: Any, _args: Any, out: torch.Tensor, cols: torch.Tensor = cols) -> torch.Tensor:
            return cols.to(out.dtype).view_as(out)

        handles.append(base.get_submodule(m["module"]).lora_A["default"].register_forward_hook(replace))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def documents(store: Store, docs: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(acts_TC, ids_T)`` of each document in ``docs``, in that order; a shard is read once for a run
    of documents it holds (not once per document)."""
    last: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # (shard file, its tensors)
    for doc in docs:
        _, start, length = store.documents[doc]
        shard = next((s for s in store.shards if s.first_doc <= doc < s.last_doc), None)
        if shard is None:
            raise IndexError(doc)
        if last is None or last[0] != shard.file:
            last = (shard.file, store.read(shard))
        acts_TC, ids_T = last[1]
        lo = start - shard.start
        yield acts_TC[lo : lo + length], ids_T[lo : lo + length]


@torch.no_grad()
def splice_kl(
    base_dir: Path,
    adapter_dir: Path,
    store: Store,
    docs: list[int],
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    recorded: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean per-token KLs over ``docs`` (document indices of the store); the model runs on ``device``
    in ``dtype`` (the adapter in float32), ``reconstruct`` gets the stored states on ``device``.
    ``recorded(acts_TC, ids_T)`` names tokens that keep their recorded state (those the SAE does not
    model: the exclusion policy's)."""
    from lorascope.models import load_adapter, load_model

    model = load_adapter(load_model(base_dir, dtype=dtype).to(device), adapter_dir).eval()
    kl_spliced = kl_base = 0.0
    tokens = 0
    for acts_TC, ids_T in documents(store, docs):
        acts_TC = acts_TC.to(device)
        input_ids = ids_T.long()[None].to(device)
        logits_lora = model(input_ids=input_ids).logits[0]
        values_TC = reconstruct(acts_TC.float())
        if recorded is not None:
            values_TC = torch.where(recorded(acts_TC, ids_T.to(device))[:, None], acts_TC.float(), values_TC)
        with spliced(model, store, values_TC):
            logits_spliced = model(input_ids=input_ids).logits[0]
        with model.disable_adapter():
            logits_base = model(input_ids=input_ids).logits[0]
        kl_spliced += float(kl_per_token(logits_lora, logits_spliced).sum())
        kl_base += float(kl_per_token(logits_lora, logits_base).sum())
        tokens += ids_T.shape[0]
    kl_spliced, kl_base = kl_spliced / tokens, kl_base / tokens
    return {
        "kl_lora_spliced": kl_spliced,
        "kl_lora_base": kl_base,
        "lora_effect_recovered": 1 - kl_spliced / kl_base if kl_base > 0 else float("nan"),
        "kl_tokens": float(tokens),
    }
