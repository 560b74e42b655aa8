"""Train, calibrate and evaluate the SAE on an activation store.

Training runs in the scaled input space (per-component RMS or one global scale); ``fold`` moves the
scale into the weights at save, so the saved SAE encodes raw ``x . A`` values directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lorascope.errors import LorascopeError
from lorascope.exclusion import Exclusion
from lorascope.extract.store import Store
from lorascope.sae.data import TokenStream, geometric_median, kept, scan
from lorascope.sae.model import BatchTopKSAE, training_loss
from lorascope.sae.params import SaeSection

StepHook = Callable[[int, dict[str, float]], None]


@dataclass
class Plan:
    """Derived sizes of one training run."""

    d_in: int
    d_sae: int
    steps: int
    dead_window: int
    train_tokens: int


def check_sizes(cfg: SaeSection, d_in: int) -> int:
    """d_sae for ``d_in`` inputs; k and aux_k that do not fit are one-line errors."""
    d_sae = cfg.expansion * d_in
    if cfg.k >= d_sae:
        raise LorascopeError(
            f"sae.k: must be < d_sae = expansion x d_in = {cfg.expansion} x {d_in} = {d_sae}, got {cfg.k}"
        )
    if cfg.aux_k > d_sae:
        raise LorascopeError(f"sae.aux_k: must be <= d_sae ({d_sae}), got {cfg.aux_k}")
    return d_sae


def plan(cfg: SaeSection, d_in: int, train_tokens: int) -> Plan:
    d_sae = check_sizes(cfg, d_in)
    steps = int(cfg.epochs * train_tokens) // cfg.batch_size
    if steps < 1:
        raise LorascopeError(
            f"sae.batch_size: {cfg.batch_size} is more than epochs x training tokens ({cfg.epochs} x {train_tokens})"
        )
    return Plan(d_in, d_sae, steps, max(1, int(cfg.dead_fraction * train_tokens)), train_tokens)


def input_scale(cfg: SaeSection, rms_D: torch.Tensor, mean_sq_norm: float) -> torch.Tensor:
    """Per-component RMS, or one scale (repeated) so that E[||x / s||^2] = d_in."""
    if cfg.scaling == "per_component":
        return rms_D.clamp(min=1e-6)
    return torch.full_like(rms_D, max((mean_sq_norm / rms_D.numel()) ** 0.5, 1e-6))


def train_step(
    sae: BatchTopKSAE,
    opt: torch.optim.Optimizer,
    x_BD: torch.Tensor,
    since_fired_F: torch.Tensor,
    dead_window: int,
    aux_k: int,
    aux_coef: float,
) -> dict[str, float]:
    """One optimiser step with the unit-norm decoder constraint; updates ``since_fired_F`` (tokens
    since each latent last fired) in place and returns the step's losses and dead-latent count."""
    dead_F = since_fired_F >= dead_window
    loss, parts, sel = training_loss(sae, x_BD, dead_F, aux_k, aux_coef)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.project_decoder_grad()
    opt.step()
    sae.normalise_decoder()
    since_fired_F += x_BD.shape[0]
    since_fired_F[torch.bincount(sel.latents_N, minlength=sae.d_sae) > 0] = 0
    return {**{k: float(v) for k, v in parts.items()}, "dead_latents": float(dead_F.sum())}


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the OS (no-op elsewhere).

    A training step frees and reallocates several MB of tensors (pre-activations, gradients, sparse
    products); by default glibc returns large freed blocks to the OS (its mmap and trim thresholds), so
    the next step faults them in again page by page. Measured at batch 512, d_sae 1792 (1 thread):
    ~500-1000 page faults per step, ~0.5-1 ms of kernel time per ~11 ms step; more with global input
    scaling, whose AuxK selection allocates more. Process-wide; freed memory stays with the process
    (up to the trim threshold)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum; a fixed value ends its auto-tuning
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


class Trainer:
    """Owns the SAE, optimiser, schedule, data stream and dead-latent counters; checkpointable."""

    def __init__(self, store: Store, held_docs: torch.Tensor, cfg: SaeSection, device: Any = "cpu") -> None:
        from transformers import get_wsd_schedule

        self.store, self.cfg, self.device = store, cfg, torch.device(device)
        check_sizes(cfg, len(store.components))  # before the pass over the store
        self.exclusion = Exclusion.of(store, cfg.exclude, "sae.exclude")
        stats = scan(store, held_docs, cfg.drop_nonfinite, self.device, self.exclusion)
        self.stats = stats
        self.plan = plan(cfg, len(store.components), stats.tokens)
        self.scale_D = input_scale(cfg, stats.rms_D, stats.mean_sq_norm)
        init = torch.Generator().manual_seed(cfg.seed)  # drawn on the CPU: the same SAE on every device
        self.sae = BatchTopKSAE(self.plan.d_in, self.plan.d_sae, cfg.k, generator=init).to(self.device)
        centre = stats.mean_D if cfg.b_dec_init == "mean" else geometric_median(stats.sample_ND)
        with torch.no_grad():
            self.sae.b_dec_D.copy_(centre / self.scale_D)
        # fused: one pass over the parameters (the plain CPU loop makes ~6): at batch 512 Adam updates
        # the whole SAE every step and was a quarter of the step (4.4 ms -> 0.7 ms at d_sae 1792)
        decoder = [self.sae.W_dec_FD]
        rest = [p for p in self.sae.parameters() if p is not self.sae.W_dec_FD]
        groups = [{"params": rest, "lr": cfg.lr}, {"params": decoder, "lr": cfg.lr * cfg.decoder_lr_scale}]
        self.opt = torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.adam_betas, fused=True)
        steps = self.plan.steps
        self.sched = get_wsd_schedule(
            self.opt,
            num_warmup_steps=int(cfg.warmup_ratio * steps),
            num_decay_steps=int(cfg.decay_ratio * steps),
            num_training_steps=steps,
            decay_type="linear",
        )
        self.stream = TokenStream(store, held_docs, cfg.batch_size, cfg.seed, self.device, self.exclusion)
        self.since_fired_F = torch.zeros(self.plan.d_sae, dtype=torch.long, device=self.device)
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "stream": self.stream.state,
            "since_fired": self.since_fired_F,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.stream.state = state["stream"]
        self.since_fired_F = state["since_fired"].to(self.device)
        self.step = state["step"]

    def run(self, on_step: StepHook | None = None, save: Callable[[], None] | None = None) -> None:
        """Train up to ``plan.steps``; ``save`` every ``checkpoint_steps``; ``on_step(step, metrics)``."""
        cfg, sae = self.cfg, self.sae
        if self.device.type == "cpu":
            keep_freed_memory()
        batches: Iterator[torch.Tensor] = iter(self.stream)
        while self.step < self.plan.steps:
            x_BD = next(batches) / self.scale_D
            metrics = train_step(
                sae, self.opt, x_BD, self.since_fired_F, self.plan.dead_window, cfg.aux_k, cfg.aux_coef
            )
            self.sched.step()
            self.step += 1
            if on_step is not None:
                metrics["lr"] = self.sched.get_last_lr()[0]
                on_step(self.step, metrics)
            if save is not None and (self.step % cfg.checkpoint_steps == 0 or self.step == self.plan.steps):
                save()


# ------------------------------------------------------------------------------- after training
def heldout_batches(
    store: Store,
    held_docs: torch.Tensor,
    part: int,
    max_tokens: int,
    device: Any = "cpu",
    exclusion: Exclusion | None = None,
) -> Iterator[torch.Tensor]:
    """Held-out tokens in store order (on ``device``): ``part`` 0 = calibration documents
    (even-numbered held-out documents), 1 = evaluation documents (odd), up to ``max_tokens``; tokens
    the exclusion policy names are left out."""
    from lorascope.devices import stream_to

    held_index = torch.cumsum(held_docs.long(), 0) - 1
    split = held_docs & (held_index % 2 == part)
    if not bool(split.any()):
        split = held_docs  # a single held-out document serves both
    seen = 0
    for shard, acts_TC, ids_T in stream_to(store, torch.device(device)):
        x_TD = acts_TC[kept(store, shard, acts_TC, ids_T, split, True, exclusion)].float()
        x_TD = x_TD[torch.isfinite(x_TD).all(1)][: max_tokens - seen]
        if x_TD.shape[0]:
            seen += x_TD.shape[0]
            yield x_TD
        if seen >= max_tokens:
            return


@torch.no_grad()
def calibrate(
    sae: BatchTopKSAE, batches: Iterator[torch.Tensor], k: int, max_tokens: int | None = None
) -> tuple[float, int]:
    """The threshold at which mean L0 over ``batches`` is k: the (k x N)-th largest pre-activation.
    Returns (threshold, N). Exact: a running merge keeps the top k x ``max_tokens`` values (N is at
    most ``max_tokens``, the most tokens ``batches`` holds), or every positive one without a bound. (A
    running top-(k x tokens so far) is not enough: an early batch's values can rank in the final top
    k x N beyond its own share.)"""
    kept = torch.zeros(0, device=sae.W_enc_DF.device)
    n = 0
    for x_BD in batches:
        n += x_BD.shape[0]
        pre = sae.pre_acts(x_BD).flatten()
        kept = torch.cat([kept, pre[pre > 0]])
        if max_tokens is not None and kept.numel() > k * max_tokens:
            kept = kept.topk(k * max_tokens).values
    if n == 0:
        raise LorascopeError("no held-out tokens to calibrate the SAE threshold on")
    if max_tokens is not None and n > max_tokens:
        raise LorascopeError(f"calibrate: got {n} tokens, more than max_tokens ({max_tokens})")
    threshold = float(kept.topk(k * n).values.min()) if kept.numel() >= k * n else 0.0
    return threshold, n


@torch.no_grad()
def evaluate(sae: BatchTopKSAE, batches: Iterator[torch.Tensor]) -> dict[str, Any]:
    """FVU per component (error and variance sums), mean L0 with the threshold, fired latents (CPU
    tensors, whatever the SAE's device)."""
    err_D = sq_D = sum_D = None
    n, l0, fired_F = 0, 0.0, torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.W_enc_DF.device)
    for x_BD in batches:
        f_BF = sae.encode(x_BD)
        recon = sae.decode(f_BF)
        err = (recon - x_BD).double().square().sum(0)
        err_D = err if err_D is None else err_D + err
        sq_D = x_BD.double().square().sum(0) + (0 if sq_D is None else sq_D)
        sum_D = x_BD.double().sum(0) + (0 if sum_D is None else sum_D)
        l0 += float((f_BF > 0).sum())
        fired_F |= (f_BF > 0).any(0)
        n += x_BD.shape[0]
    if n == 0:
        raise LorascopeError("no held-out tokens to evaluate the SAE on")
    assert err_D is not None and sq_D is not None and sum_D is not None  # set by the first batch
    var_D = sq_D - sum_D.square() / n
    return {"err_D": err_D.cpu(), "var_D": var_D.cpu(), "l0": l0 / n, "tokens": n, "fired_F": fired_F.cpu()}


def grouped_fvu(err_D: torch.Tensor, var_D: torch.Tensor, groups: list[str]) -> dict[str, float]:
    """FVU per group label (one label per input column)."""
    out = {}
    for g in dict.fromkeys(groups):
        cols = torch.tensor([i for i, x in enumerate(groups) if x == g])
        out[g] = float(err_D[cols].sum() / var_D[cols].sum().clamp(min=1e-12))
    return out


def fold(sae: BatchTopKSAE, scale_D: torch.Tensor) -> BatchTopKSAE:
    """An SAE on raw inputs equal to ``sae`` on ``x / scale``: W_enc / s, W_dec * s, b_dec * s (on
    ``sae``'s device)."""
    raw = BatchTopKSAE(sae.d_in, sae.d_sae, sae.k).to(sae.W_enc_DF.device)
    with torch.no_grad():
        raw.W_enc_DF.copy_(sae.W_enc_DF / scale_D[:, None])
        raw.W_dec_FD.copy_(sae.W_dec_FD * scale_D[None, :])
        raw.b_enc_F.copy_(sae.b_enc_F)
        raw.b_dec_D.copy_(sae.b_dec_D * scale_D)
        raw.threshold.copy_(sae.threshold)
    return raw
