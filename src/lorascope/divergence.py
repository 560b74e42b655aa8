"""KL divergence and cross-entropy from logits, in float32: what ablate, attribute and the SAE's splice
measure a changed model by (one formula for all of them)."""

from __future__ import annotations

from typing import Any

import torch


def kl_per_token(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position, from logits ``[..., V]``."""
    logp, logq = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def compare(logp_ref_RV: torch.Tensor, logits_BRV: torch.Tensor, labels_R: torch.Tensor) -> tuple[Any, Any]:
    """Per-row, per-token ``KL(P_ref || P_row)`` and ``-log P_row(label)``, in float32: ``[B, R]`` each
    (``logp_ref_RV``: the reference's log-probabilities, computed once for every row)."""
    logq_BRV = logits_BRV.float().log_softmax(-1)
    kl_BR = (logp_ref_RV.exp() * (logp_ref_RV - logq_BRV)).sum(-1)
    ce_BR = -logq_BRV.gather(-1, labels_R.expand(logq_BRV.shape[0], -1)[..., None])[..., 0]
    return kl_BR, ce_BR
