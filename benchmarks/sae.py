"""SAE training throughput and quality: lorascope vs SAELens BatchTopK vs EleutherAI sparsify, side by side.

All three train on the same synthetic adapter states (non-negative combinations of 1 to 16 of d_sae
planted unit directions plus noise, per-component scales spread 10x, scaled to unit RMS per component
as lorascope trains), same d_in / d_sae / k / batch, same Adam learning rate, same number of steps, same threads, in one
process. Each runs its own training step: lorascope's sparse BatchTopK step (``training_loss``), SAELens's
``BatchTopKTrainingSAE.training_forward_pass`` (its trainer's step), sparsify's ``SparseCoder`` forward
(TopK with its sparse decoder) with its unit-norm decoder handling. Reported: tokens/s (median step time
after warm-up) and FVU on held-out tokens after the same number of training tokens; then the ratios
lorascope / sparsify (goal >= 1.5) and lorascope / SAELens (goal >= 4).

Usage: python benchmarks/sae.py [--d-in 448] [--expansion 8] [--k 16] [--batch 4096] [--steps 40]
       [--threads 2] [--lr 1e-3]   (needs the `bench` extra: pip install -e ".[bench]")
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def planted_data(d_in: int, n_true: int, tokens: int, seed: int = 1234) -> torch.Tensor:
    """Each token: 1 to 16 (uniform) planted unit directions with random weights, plus noise; token
    sparsity varies as adapter states do (the regime BatchTopK is for)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_true, d_in, generator=g), dim=1)
    which = torch.randint(0, n_true, (tokens, 16), generator=g)
    active = torch.arange(16) < torch.randint(1, 17, (tokens, 1), generator=g)
    coef = torch.rand(tokens, 16, generator=g) * 2 * active
    x = torch.einsum("tk,tkd->td", coef, dirs[which]) + 0.05 * torch.randn(tokens, d_in, generator=g)
    x = x * torch.logspace(0, 1, d_in)
    return x / x.square().mean(0).sqrt()  # per-component unit RMS, as lorascope's default scaling


def time_steps(step: Callable[[torch.Tensor], None], batches: list[torch.Tensor], warmup: int = 3) -> float:
    times = []
    for i, x in enumerate(batches):
        t0 = time.perf_counter()
        step(x)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fvu(reconstruct: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    with torch.no_grad():
        err = (reconstruct(x) - x).square().sum()
        return float(err / (x - x.mean(0)).square().sum())


def lorascope_runner(args: argparse.Namespace, d_sae: int, mean_D: torch.Tensor):
    from lorascope.sae.model import BatchTopKSAE
    from lorascope.sae.train import train_step

    sae = BatchTopKSAE(args.d_in, d_sae, args.k, generator=torch.Generator().manual_seed(0))
    sae.b_dec_D.data.copy_(mean_D)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr, fused=True)  # as the stage's Trainer
    since_fired = torch.zeros(d_sae, dtype=torch.long)

    def step(x: torch.Tensor) -> None:  # the stage's own step (the schedule aside)
        train_step(sae, opt, x, since_fired, 10 * args.batch, args.aux_k, 1 / 32)

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return sae.decode_sparse(sae.select(x, args.k))

    return step, reconstruct


def saelens_runner(args: argparse.Namespace, d_sae: int, mean_D: torch.Tensor):
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(0)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=args.d_in, d_sae=d_sae, k=args.k))
    sae.b_dec.data.copy_(mean_D)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    n = [0]

    def step(x: torch.Tensor) -> None:
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=n[0], is_logging_step=False
            )
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        n[0] += 1

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return sae.decode(sae.encode(x))

    return step, reconstruct


def sparsify_runner(args: argparse.Namespace, d_sae: int, mean_D: torch.Tensor):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=d_sae, k=args.k), device="cpu")
    sae.b_dec.data.copy_(mean_D)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    since_fired = torch.zeros(d_sae, dtype=torch.long)

    def step(x: torch.Tensor) -> None:
        dead = since_fired >= 10 * args.batch
        out = sae(x, dead_mask=dead)
        loss = out.fvu + (out.auxk_loss / 32 if dead.any() else 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        since_fired.add_(x.shape[0])
        since_fired[torch.bincount(out.latent_indices.flatten(), minlength=d_sae) > 0] = 0

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return sae(x).sae_out

    return step, reconstruct


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=448)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--aux-k", type=int, default=256)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d_sae = args.expansion * args.d_in
    data = planted_data(args.d_in, d_sae, args.batch * (args.steps + 4))
    batches = list(data[: args.batch * args.steps].split(args.batch))
    heldout = data[args.batch * args.steps :]
    print(
        f"d_in {args.d_in}  d_sae {d_sae}  k {args.k}  batch {args.batch}  steps {args.steps}  threads {args.threads}"
    )
    print(f"{'trainer':<28}{'tokens/s':>12}{'FVU after':>12}")
    results = {}
    for name, build in (("lorascope (sparse BatchTopK)", lorascope_runner),
                        ("SAELens BatchTopK", saelens_runner),
                        ("sparsify TopK (sparse dec.)", sparsify_runner)):  # fmt: skip
        step, reconstruct = build(args, d_sae, batches[0].mean(0))  # the same b_dec init for all
        seconds = time_steps(step, batches)
        results[name] = (args.batch / seconds, fvu(reconstruct, heldout))
        print(f"{name:<28}{results[name][0]:>12,.0f}{results[name][1]:>12.4f}")
    ours, lens, sparsify = (results[n][0] for n in results)
    print(f"lorascope / sparsify: {ours / sparsify:.2f}x tokens/s (goal >= 1.5)")
    print(f"lorascope / SAELens:  {ours / lens:.2f}x tokens/s (goal >= 4)")


if __name__ == "__main__":
    main()
