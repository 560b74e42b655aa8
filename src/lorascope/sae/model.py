"""The BatchTopK sparse autoencoder and its sparse training step.

Encoder ``ReLU((x - b_dec) W_enc + b_enc)``; during training the ``k x B`` largest pre-activations of
the whole batch are kept (BatchTopK); at inference a calibrated threshold replaces the batch
(JumpReLU-style, mean L0 = k). Decoder rows are kept at unit norm during training, so a latent's
activation is the norm of its contribution and ranking by activation ranks by contribution.

The training step is sparse: the dense matmul computes pre-activations without autograd only to
*select* latents; the selected values are recomputed from gathered encoder columns (gradient flows
to those k x B entries only) and decoded with ``embedding_bag`` (gradient to the selected decoder
rows only). That is the same loss and gradient as the dense formulation at a fraction of the cost
(d_sae / k fewer multiply-adds in the backward); the tests check the gradients against the dense
computation in float64.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@dataclass
class Selection:
    """Selected (token row, latent) pairs sorted by row, their activations, and bag offsets."""

    rows_N: torch.Tensor
    latents_N: torch.Tensor
    values_N: torch.Tensor
    offsets_B: torch.Tensor


class BatchTopKSAE(torch.nn.Module):
    """``d_in`` -> ``d_sae`` latents; ``threshold`` is the calibrated inference threshold."""

    threshold: torch.Tensor  # a registered buffer (scalar)

    def __init__(self, d_in: int, d_sae: int, k: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        W_dec_FD = torch.randn(d_sae, d_in, generator=generator)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec_FD = torch.nn.Parameter(W_dec_FD)
        # The encoder starts as the decoder transpose, unscaled (tied init, as Gao et al. and sparsify).
        # A small encoder (it was x 1/sqrt(d_in)) gives a lower FVU after 150 steps but kills latents at
        # convergence: Adam's first steps grow the few latents that win the first batches by lr per
        # entry, many times their initial size, and the rest never reach the batch top-k again (AuxK
        # does not bring them back). Measured at convergence (benchmarks/sae_quality.py, d_in 224,
        # 1M tokens, per-component scaling): alive latents 395 -> 1785 of 1792, planted directions
        # recovered 32% -> 57%, FVU 0.207 -> 0.154.
        self.W_enc_DF = torch.nn.Parameter(W_dec_FD.T.clone())
        self.b_enc_F = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec_D = torch.nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold", torch.zeros(()))
        self._cutoffs: dict[str, float] = {}  # selection speed-up only, not state (see _batch_topk)

    # ------------------------------------------------------------------------------ inference
    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        return F.relu(self.hidden_pre(x_BD))

    def hidden_pre(self, x_BD: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) W_enc + b_enc`` before the ReLU (one fused matmul + bias)."""
        return torch.addmm(self.b_enc_F, x_BD - self.b_dec_D, self.W_enc_DF)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Latent activations with the calibrated threshold (dense ``[B, d_sae]``)."""
        pre_BF = self.pre_acts(x_BD)
        return pre_BF * (pre_BF > self.threshold)

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        return f_BF @ self.W_dec_FD + self.b_dec_D

    # ------------------------------------------------------------------------------- training
    def select(
        self,
        x_BD: torch.Tensor,
        k: int,
        pre_BF: torch.Tensor | None = None,
        hint: str = "main",
        columns: torch.Tensor | None = None,
    ) -> Selection:
        """BatchTopK: the ``k x B`` largest positive pre-activations over the batch (``pre_BF``, before
        or after the ReLU, may be given; with ``columns`` it holds only those latents' columns, e.g.
        the dead latents). The values carry a sparse gradient to the encoder."""
        with torch.no_grad():
            if pre_BF is None:
                pre_BF = self.pre_acts(x_BD)
            rows_N, latents_N, picked_N = self._pick(pre_BF, k, hint, columns)
            offsets_B = _offsets(rows_N, x_BD.shape[0])
        values_N = _SelectedEncode.apply(
            picked_N, self.W_enc_DF, self.b_enc_F, self.b_dec_D, x_BD, rows_N, latents_N
        )
        return Selection(rows_N, latents_N, values_N, offsets_B)

    @torch.no_grad()
    def _pick(
        self, pre_BF: torch.Tensor, k: int, hint: str, columns: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, latents, values) of the batch top ``k x B``, sorted by row then latent."""
        width = pre_BF.shape[1]
        flat = pre_BF.flatten()
        flat_N = _batch_topk(flat, k * pre_BF.shape[0], self._cutoffs, hint)  # ascending = by row
        rows_N, latents_N = flat_N // width, flat_N % width
        if columns is not None:
            latents_N = columns[latents_N]
        return rows_N, latents_N, flat[flat_N]

    def decode_sparse(self, sel: Selection, with_bias: bool = True) -> torch.Tensor:
        out_BD = _SelectedDecode.apply(sel.values_N, self.W_dec_FD, sel.rows_N, sel.latents_N, sel.offsets_B)
        return out_BD + self.b_dec_D if with_bias else out_BD

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each decoder row (unit-norm constraint)."""
        g = self.W_dec_FD.grad
        if g is not None:
            g.addcmul_(torch.linalg.vecdot(g, self.W_dec_FD).unsqueeze(1), self.W_dec_FD, value=-1)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec_FD.div_(self.W_dec_FD.norm(dim=1, keepdim=True).clamp(min=1e-12))


def _offsets(rows_N: torch.Tensor, bags: int) -> torch.Tensor:
    """Start of each bag (row) in entries sorted by row."""
    counts = torch.bincount(rows_N, minlength=bags)
    return torch.cumsum(counts, 0) - counts


def _above(flat: torch.Tensor, cut: float) -> torch.Tensor:
    """Ascending indices of the entries of ``flat`` above ``cut``, for a cut that leaves few. The
    comparison's bytes are read as int64 words, so ``nonzero`` runs over an eighth of the entries and
    then over the few words holding a candidate (a plain ``nonzero`` over a batch x d_sae mask costs
    more than the comparison itself)."""
    n = flat.numel()
    mask = torch.empty(-(-n // 8) * 8, dtype=torch.bool, device=flat.device)
    mask[n:] = False
    torch.gt(flat, cut, out=mask[:n])
    words = mask.view(torch.int64).nonzero().squeeze(1)
    hits = mask.view(-1, 8)[words].nonzero()
    return words[hits[:, 0]] * 8 + hits[:, 1]


def _batch_topk(flat: torch.Tensor, n: int, cutoffs: dict[str, float], hint: str) -> torch.Tensor:
    """Ascending indices of the ``n`` largest positive entries of ``flat`` (ties broken by index).

    Exact but fast: a threshold a little under the previous step's cut-off (which moves slowly)
    leaves a small candidate set, which must hold the top ``n`` whenever it has at least ``n``
    entries (else the threshold is lowered); the exact cut is then the candidates' n-th largest.
    """
    # asking for every entry or more (AuxK with few dead latents): every positive one, in one pass
    cut = cutoffs.get(hint, 0.0) if n < flat.numel() else 0.0
    while True:
        candidates = _above(flat, cut) if cut > 0 else (flat > 0).nonzero().squeeze(1)
        if candidates.numel() >= n or cut <= 0:
            break
        cut = cut / 4 if cut > 1e-3 else 0.0  # a few passes at most, however far the cut fell
    values = flat[candidates]
    if values.numel() > n:
        kth = values.kthvalue(values.numel() - n + 1).values
        above, tied = values > kth, values == kth
        keep = above | (tied & (torch.cumsum(tied, 0) <= n - int(above.sum())))
        candidates, values = candidates[keep], values[keep]
    if values.numel():
        cutoffs[hint] = 0.9 * float(values.min())
    return candidates


class _SelectedEncode(torch.autograd.Function):
    """The selected pre-activations (already computed without autograd) with the encoder gradient
    at those (token, latent) pairs only: dW_enc = centred^T G as one sparse-dense matmul."""

    @staticmethod
    def forward(ctx, picked_N, W_enc_DF, b_enc_F, b_dec_D, x_BD, rows_N, latents_N):  # noqa: ANN001, ANN205
        ctx.save_for_backward(W_enc_DF, b_dec_D, x_BD, rows_N, latents_N)
        return picked_N.clone()

    @staticmethod
    def backward(ctx, grad_N):  # noqa: ANN001, ANN205
        W_enc_DF, b_dec_D, x_BD, rows_N, latents_N = ctx.saved_tensors
        d_sae, B = W_enc_DF.shape[1], x_BD.shape[0]
        G_FB = torch.sparse_coo_tensor(
            torch.stack([latents_N, rows_N]), grad_N, (d_sae, B), check_invariants=False
        )
        grad_W_enc_DF = torch.sparse.mm(G_FB, x_BD - b_dec_D).T
        grad_b_enc_F = torch.zeros(d_sae, dtype=grad_N.dtype, device=grad_N.device).index_add_(
            0, latents_N, grad_N
        )
        grad_b_dec_D = -(W_enc_DF @ grad_b_enc_F)
        return None, grad_W_enc_DF, grad_b_enc_F, grad_b_dec_D, None, None, None


class _SelectedDecode(torch.autograd.Function):
    """Sum of the selected latents' decoder rows weighted by their values; the backward is a
    sampled dense-dense product for the values and a sparse-dense matmul for the rows."""

    @staticmethod
    def forward(ctx, values_N, W_dec_FD, rows_N, latents_N, offsets_B):  # noqa: ANN001, ANN205
        ctx.save_for_backward(values_N, W_dec_FD, rows_N, latents_N, offsets_B)
        return F.embedding_bag(latents_N, W_dec_FD, offsets_B, mode="sum", per_sample_weights=values_N)

    @staticmethod
    def backward(ctx, grad_BD):  # noqa: ANN001, ANN205
        values_N, W_dec_FD, rows_N, latents_N, offsets_B = ctx.saved_tensors
        B, d_sae = grad_BD.shape[0], W_dec_FD.shape[0]
        crow = torch.cat([offsets_B, offsets_B.new_tensor([latents_N.numel()])])
        pattern = torch.sparse_csr_tensor(
            crow, latents_N, torch.zeros_like(values_N), (B, d_sae), check_invariants=False
        )
        grad_values_N = torch.sparse.sampled_addmm(
            pattern, grad_BD.contiguous(), W_dec_FD.T, beta=0.0
        ).values()
        S_FB = torch.sparse_coo_tensor(
            torch.stack([latents_N, rows_N]), values_N, (d_sae, B), check_invariants=False
        )
        grad_W_dec_FD = torch.sparse.mm(S_FB, grad_BD)
        return grad_values_N, grad_W_dec_FD, None, None, None


def training_loss(
    sae: BatchTopKSAE, x_BD: torch.Tensor, dead_F: torch.Tensor | None, aux_k: int, aux_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Selection]:
    """Reconstruction MSE (summed over dims, mean over tokens) plus the AuxK loss, which asks the
    ``aux_k`` best *dead* latents to reconstruct the residual (normalised by the residual's size).

    Both selections go through one encode and one decode (the AuxK entries as B more bags), so the
    backward is one sparse matmul per weight matrix whatever the number of dead latents."""
    B = x_BD.shape[0]
    with torch.no_grad():  # no ReLU needed: selection only takes positive entries
        pre_BF = sae.hidden_pre(x_BD)
        rows_N, latents_N, picked_N = sae._pick(pre_BF, sae.k, "main")
        n_main = rows_N.numel()
        bags_N = rows_N
        if dead_F is not None and aux_coef > 0 and bool(dead_F.any()):
            # only the dead latents' columns: few once training settles
            dead_cols = dead_F.nonzero().flatten()
            aux_rows, aux_latents, aux_picked = sae._pick(
                pre_BF.index_select(1, dead_cols), aux_k, "aux", dead_cols
            )
            if aux_rows.numel():
                rows_N = torch.cat([rows_N, aux_rows])
                latents_N = torch.cat([latents_N, aux_latents])
                picked_N = torch.cat([picked_N, aux_picked])
                bags_N = torch.cat([bags_N, aux_rows + B])  # the AuxK reconstruction: bags B .. 2B - 1
        n_bags = B if bags_N.numel() == n_main else 2 * B
        offsets = _offsets(bags_N, n_bags)
    values_N = _SelectedEncode.apply(
        picked_N, sae.W_enc_DF, sae.b_enc_F, sae.b_dec_D, x_BD, rows_N, latents_N
    )
    out_BD = _SelectedDecode.apply(values_N, sae.W_dec_FD, bags_N, latents_N, offsets)
    recon_BD = out_BD[:B] + sae.b_dec_D
    mse = (recon_BD - x_BD).square().sum(-1).mean()
    parts = {"mse": mse.detach()}
    loss = mse
    if n_bags > B:
        residual_BD = (x_BD - recon_BD).detach()
        scale = residual_BD.square().sum(-1).mean().clamp(min=1e-12)
        aux = (out_BD[B:] - residual_BD).square().sum(-1).mean() / scale
        parts["aux"] = aux.detach()
        loss = loss + aux_coef * aux
    sel = Selection(rows_N[:n_main], latents_N[:n_main], values_N[:n_main], offsets[:B])
    return loss, parts, sel
