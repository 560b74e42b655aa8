"""The token exclusion policy (``<section>.exclude``) of the ``sae`` and ``contexts`` stages, which ``categorize``'s
Figure 2 applies as the SAE does.

Outlier tokens (attention sinks: the first position, chat-template special tokens) carry activations
hundreds of times the median (``outliers.json``); a stage leaves out the tokens its policy names:

* ``first_position``: the first token of every document;
* ``special_tokens``: the ids ``index.json`` records as the tokenizer's special tokens;
* ``norm_ratio``: tokens whose activation vector's L2 norm (float32, raw store units) exceeds that
  many times the store's median token norm (``outliers.json``).

The reasons may overlap; ``excluded`` counts a token once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorascope.errors import LorascopeError
from lorascope.extract.store import Store

REASONS = ("first_position", "special_tokens", "norm")


@dataclass
class Exclusion:
    first_position: bool
    special_ids: torch.Tensor | None
    norm_limit: float | None

    @classmethod
    def of(cls, store: Store, policy: Any, key: str) -> Exclusion:
        """The policy ``policy`` (an ``ExclusionSection`` read from params key ``key``) for ``store``;
        a store that lacks what the policy needs is a one-line error."""
        from lorascope.extract import outliers

        special = None
        if policy.special_tokens:
            ids = store.index.get("special_token_ids")
            if ids is None:
                raise LorascopeError(
                    f"{key}.special_tokens: {store.root}/index.json records no special token ids (re-run "
                    f"`lorascope extract --source {store.source}`, or set {key}.special_tokens: false)"
                )
            special = torch.tensor(ids, dtype=torch.long)
        limit = None
        if policy.norm_ratio is not None:
            rec = outliers.read(store.root)
            if rec is None:
                raise LorascopeError(
                    f"{key}.norm_ratio: {store.root}/{outliers.FILE} not found (the median token norm; re-run "
                    f"`lorascope extract --source {store.source}`, or set {key}.norm_ratio: null)"
                )
            limit = policy.norm_ratio * rec["token_norm_median"]
        return cls(policy.first_position, special, limit)

    def reasons(
        self, acts_TC: torch.Tensor, ids_T: torch.Tensor, starts: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per reason of the policy, which tokens it excludes (bool, on ``acts_TC``'s device);
        ``starts``: local indices of the first token of each document."""
        dev, T = acts_TC.device, acts_TC.shape[0]
        out = {}
        if self.first_position:
            first = torch.zeros(T, dtype=torch.bool, device=dev)
            first[starts.to(dev)] = True
            out["first_position"] = first
        if self.special_ids is not None:
            out["special_tokens"] = torch.isin(ids_T.to(dev).long(), self.special_ids.to(dev))
        if self.norm_limit is not None:
            out["norm"] = acts_TC.float().norm(dim=1) > self.norm_limit
        return out

    def excluded(self, acts_TC: torch.Tensor, ids_T: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Whether each token is excluded for any reason."""
        out = torch.zeros(acts_TC.shape[0], dtype=torch.bool, device=acts_TC.device)
        for mask in self.reasons(acts_TC, ids_T, starts).values():
            out |= mask
        return out


def count(reasons: dict[str, torch.Tensor], totals: dict[str, int]) -> None:
    """Add one block's counts to ``totals`` (``excluded`` and one key per reason)."""
    union = None
    for r in REASONS:
        if r in reasons:
            totals[r] = totals.get(r, 0) + int(reasons[r].sum())
            union = reasons[r] if union is None else union | reasons[r]
        else:
            totals.setdefault(r, 0)
    totals["excluded"] = totals.get("excluded", 0) + (int(union.sum()) if union is not None else 0)
