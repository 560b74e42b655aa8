"""Measure ablations on one sequence: per response token, KL(P_lora || P_ablated) and the ablated
model's cross-entropy, next to the adapter as trained; and the KL over every position (prompt included),
as the paper's code averaged it.

Two paths with the same results: ``prefix`` (one recorded unablated pass, then each batch of
ablations runs from its first changed layer, logits only at response positions) and ``naive`` (a full
forward of the whole model per batch, all logits, then the response positions), the reference the
tests and the benchmark compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch

from lorascope.ablate.prefix import LayerCache
from lorascope.ablate.targets import Ablation
from lorascope.components import Component
from lorascope.divergence import compare
from lorascope.interventions import State, keep_rows

DIRECTION = "KL(P_lora || P_ablated)"
"""The divergence every output reports: expectation under the adapter as trained."""


@dataclass
class Stats:
    """Sums over the response tokens of one sequence for one ablation (``tokens``, ``kl_sum``, ``kl_max``,
    ``ce_sum``), and the KL summed over every predicted position (``all_tokens`` = T - 1: each token from
    the one before it, prompt included)."""

    tokens: int
    kl_sum: float
    kl_max: float
    ce_sum: float
    all_tokens: int
    all_kl_sum: float

    def to_json(self) -> dict[str, float]:
        return {"tokens": self.tokens, "kl_sum": self.kl_sum, "kl_max": self.kl_max, "ce_sum": self.ce_sum,
                "all_tokens": self.all_tokens, "all_kl_sum": self.all_kl_sum}  # fmt: skip


class Ablator:
    """Runs ablations of ``comps`` on a peft model, ``batch_size`` ablations per forward."""

    def __init__(
        self,
        peft_model: Any,
        comps: Sequence[Component],
        batch_size: int = 8,
        logit_chunk: int = 512,
        prefix_reuse: bool = True,
    ) -> None:
        self.model = peft_model
        self.base = peft_model.get_base_model()
        self.lm_head = self.base.get_output_embeddings()
        self.comps = list(comps)
        self.state = State(peft_model, comps)
        self.cache = LayerCache(self.base)
        self.batch_size, self.logit_chunk, self.prefix_reuse = batch_size, logit_chunk, prefix_reuse

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @torch.no_grad()
    def measure(
        self, ids_T: torch.Tensor, first: int, ablations: Sequence[Ablation]
    ) -> tuple[Stats, list[Stats]]:
        """``(adapter as trained, one per ablation)`` over the tokens ``first..T-1`` of ``ids_T``
        (each predicted from the position before it), and the KL over all tokens ``1..T-1``; the first's
        KL sums are 0."""
        ids_1T = ids_T.to(self.device, torch.long)[None]
        positions = torch.arange(0, ids_1T.shape[1] - 1, device=self.device)  # every predicting position
        labels_R = ids_1T[0, 1:]
        response = first - 1  # positions[response:] predict the response tokens
        out: list[Stats | None] = [None] * len(ablations)
        with self.state.attach():
            if self.prefix_reuse:
                hidden_1TD = self.cache.record(ids_1T)
            else:
                hidden_1TD = self.base.get_decoder()(input_ids=ids_1T, use_cache=False).last_hidden_state
            logp_lora_RV = self.lm_head(hidden_1TD[0, positions]).float().log_softmax(-1)
            ce_lora = -logp_lora_RV[response:].gather(-1, labels_R[response:, None])[:, 0]
            lora = Stats(
                len(positions) - response, 0.0, 0.0, float(ce_lora.double().sum()), len(positions), 0.0
            )
            for batch in self._batches(ablations):
                keep_BK = keep_rows([ablations[i].components for i in batch], len(self.comps), self.device)
                with self.state.changed(keep_BK, None):
                    stats = self._run(batch, ablations, ids_1T, positions, labels_R, logp_lora_RV, response)
                for i, s in zip(batch, stats, strict=True):
                    out[i] = s
        return lora, [s for s in out if s is not None]

    def _batches(self, ablations: Sequence[Ablation]) -> list[list[int]]:
        """Indices of ``ablations`` in batches; with prefix reuse each batch shares a start layer."""
        order = list(range(len(ablations)))
        if not self.prefix_reuse:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        start = [a.start_layer(self.comps) for a in ablations]
        batches = []
        for _, group in groupby(sorted(order, key=lambda i: (start[i], i)), key=lambda i: start[i]):
            members = list(group)
            batches += [members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)]
        return batches

    def _run(
        self,
        batch: list[int],
        ablations: Sequence[Ablation],
        ids_1T: torch.Tensor,
        positions: torch.Tensor,
        labels_R: torch.Tensor,
        logp_lora_RV: torch.Tensor,
        response: int,
    ) -> list[Stats]:
        B = len(batch)
        if self.prefix_reuse:
            hidden_BTD = self.cache.run_from(ablations[batch[0]].start_layer(self.comps), B)

            def logits(chunk: torch.Tensor) -> torch.Tensor:
                return self.lm_head(hidden_BTD[:, chunk])
        else:
            full_BTV = self.model(input_ids=ids_1T.expand(B, -1)).logits

            def logits(chunk: torch.Tensor) -> torch.Tensor:
                return full_BTV[:, chunk]

        kl_sum, ce_sum = torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
        all_kl_sum = torch.zeros(B, dtype=torch.float64)
        kl_max = torch.zeros(B)
        for lo in range(0, len(positions), self.logit_chunk):
            sl = slice(lo, lo + self.logit_chunk)
            kl_BR, ce_BR = compare(logp_lora_RV[sl], logits(positions[sl]), labels_R[sl])
            all_kl_sum += kl_BR.double().sum(-1).cpu()
            skip = max(0, response - lo)  # the chunk's positions before the response
            if skip < kl_BR.shape[1]:
                kl_sum += kl_BR[:, skip:].double().sum(-1).cpu()
                kl_max = torch.maximum(kl_max, kl_BR[:, skip:].max(-1).values.cpu())
                ce_sum += ce_BR[:, skip:].double().sum(-1).cpu()
        n, n_all = len(positions) - response, len(positions)
        return [
            Stats(n, float(kl_sum[b]), float(kl_max[b]), float(ce_sum[b]), n_all, float(all_kl_sum[b]))
            for b in range(B)
        ]
