"""Per sequence: the screened and the exact effect of ablating each unit on the response tokens.

**Screen** (attribution patching, AtP: Nanda 2023; Kramár et al. 2024): one forward and one backward give
the gradient ``g_TC`` of the response tokens' summed cross-entropy with respect to the adapter state
``a_TC``; ablating a unit moves the state by ``d_TC`` (a component: ``-a`` on its columns; a latent:
``-f_j(t) W_dec[j]``), so its first-order ΔCE is ``sum_t d_t . g_t``: ``-sum(a * g)`` over a component's
columns, ``-sum_t f_j(t) (g_t . W_dec[j])`` for a latent (one matmul for every latent). Screened on ΔCE:
``KL(P_lora || P_ablated)``, which the paper's Figure 3 reports, is zero with zero gradient at the unablated
point (its first term is second order), so a gradient cannot rank by it.

AtP's known failure modes, and how they show here: a saturated attention softmax or a saturating
nonlinearity makes the linear estimate miss a large effect, and effects that cancel through later layers
make it overstate one (Kramár et al.); a rank-1 component's ablation is a large move (the whole
contribution), not a small patch. So the screen is checked on every run: the top units and a random
control are ablated exactly (``exact``), and the rank correlation between screened and exact ΔCE is
reported (over all components, and over the exactly measured units).

**Exact**: the unablated pass records the state; then each batch of ablations runs one forward, one row
per unit (components zeroed, latents subtracted), and gives per-token KL(P_lora || P_ablated) and ΔCE over
the response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorascope.attribute.hooks import State, latent_offset
from lorascope.attribute.units import Unit
from lorascope.divergence import compare


@dataclass
class Sums:
    """Sums over one sequence's response tokens (``tokens``): per unit, screened ΔCE, exact ΔCE and KL."""

    tokens: int
    ce_lora: float
    screened: list[float]
    delta_ce: dict[str, float]
    kl: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "ce_lora": self.ce_lora, "screened": self.screened,
                "delta_ce": self.delta_ce, "kl": self.kl}  # fmt: skip


def screen(
    state: State, model: Any, sae: Any, units: Sequence[Unit], ids_1T: torch.Tensor, first: int
) -> tuple[float, list[float]]:
    """``(CE of the adapter as trained, first-order ΔCE per unit)``, summed over tokens ``first..T-1``."""
    acts: list[torch.Tensor] = []

    def leaf(out: torch.Tensor) -> torch.Tensor:  # the state as a leaf the backward reaches
        a = out.detach().float().requires_grad_()
        acts.append(a)
        return a.to(out.dtype)

    hooks = [
        state.base.get_submodule(c.module).lora_A["default"].register_forward_hook(lambda _m, _a, o: leaf(o))
        for c in state.comps
    ]
    try:
        with torch.enable_grad():
            logits_1TV = model(input_ids=ids_1T).logits
            logq_RV = logits_1TV[0, first - 1 : -1].float().log_softmax(-1)
            ce = -logq_RV.gather(-1, ids_1T[0, first:, None]).sum()
            grads = torch.autograd.grad(ce, acts)
    finally:
        for h in hooks:
            h.remove()
    a_TC = torch.cat([a.detach()[0] for a in acts], -1)
    g_TC = torch.cat([g[0] for g in grads], -1)
    per_column_C = -(a_TC * g_TC).sum(0)
    latent_units = [u for u in units if u.kind == "latent"]
    by_latent: dict[int, float] = {}
    if latent_units:
        j = torch.tensor([u.index for u in latent_units], device=a_TC.device)
        f_TJ = sae.encode(a_TC)[:, j]
        g_dec_TJ = g_TC @ sae.W_dec_FD[j].float().T
        by_latent = dict(
            zip([u.index for u in latent_units], (-(f_TJ * g_dec_TJ).sum(0)).tolist(), strict=True)
        )
    out = [
        float(per_column_C[state.cols(u.index)].sum()) if u.kind == "component" else by_latent[u.index]
        for u in units
    ]
    return float(ce.detach()), out


@torch.no_grad()
def exact(
    state: State,
    model: Any,
    sae: Any,
    units: Sequence[Unit],
    ids_1T: torch.Tensor,
    first: int,
    batch_size: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """``(ΔCE, KL)`` summed over tokens ``first..T-1`` for each of ``units``, ablated one at a time."""
    labels_R = ids_1T[0, first:]
    with state.recording() as recorded:
        logits_1TV = model(input_ids=ids_1T).logits
    acts_1TC = state.gather(recorded).float()
    logp_lora_RV = logits_1TV[0, first - 1 : -1].float().log_softmax(-1)
    ce_lora = float(-logp_lora_RV.gather(-1, labels_R[:, None]).sum())
    delta_ce: dict[str, float] = {}
    kl: dict[str, float] = {}
    for lo in range(0, len(units), batch_size):
        batch = list(units[lo : lo + batch_size])
        keep_BK = torch.ones(len(batch), len(state.comps), device=acts_1TC.device)
        offset_BTC = torch.zeros(len(batch), *acts_1TC.shape[1:], device=acts_1TC.device)
        for b, u in enumerate(batch):
            if u.kind == "component":
                keep_BK[b, u.index] = 0
            else:
                offset_BTC[b] = latent_offset(sae, u.index, acts_1TC)[0]
        with state.changed(keep_BK, offset_BTC):
            logits_BTV = model(input_ids=ids_1T.expand(len(batch), -1)).logits
        kl_BR, ce_BR = compare(logp_lora_RV, logits_BTV[:, first - 1 : -1], labels_R)
        for b, u in enumerate(batch):
            delta_ce[u.name] = float(ce_BR[b].double().sum()) - ce_lora
            kl[u.name] = float(kl_BR[b].double().sum())
    return delta_ce, kl
