"""SAE quality at convergence: lorascope vs SAELens BatchTopK (and sparsify TopK) on planted features.

The data is planted, so what an SAE should find is known. Each token of a synthetic adapter state is a
sparse non-negative combination of ``--features`` unit directions (drawn in per-component-normalised
units) plus a per-component offset and a little noise; feature frequencies follow a power law
(1 / (rank + 20): with the defaults the most frequent fires on 13% of the tokens, the rarest on 0.42%),
about ``--active`` fire per token, with coefficients uniform in [0.25, 2]. The defaults (224
components, 600 directions, d_sae 1792, 1M training tokens) finish in about 15 minutes on one CPU
thread; ``--d-in 448 --features 1200`` is the paper's width (SAELens then takes about an hour).
The components are then multiplied by scales spread ``--spread`` x (log-uniform, shuffled), as an
adapter's x . A values differ between matrices; ``--spread 1`` is the equal-scales variant.

Every trainer sees exactly the same batches: the planted tokens are an in-memory activation store that
lorascope's own ``Trainer`` reads (held-out documents, statistics pass, shuffled stream), and the peers
are fed the same stream divided by the same input scale (per-component RMS, or one global scale), so
for each scaling mode all trainers train on identical normalised data. Each peer runs with its own
defaults (SAELens 6 ``BatchTopKTrainingSAE``: decoder init norm 0.1, acts rescaled by the decoder norm,
AuxK coefficient 1, dead window 1000 steps, torch's Adam at 3e-4, constant; a second SAELens run at lorascope's
lr (or at ``--saelens-lr``) compares the two at equal settings (the decoder-lr gap was invisible at 3e-4 vs
1e-3); sparsify's Adam path: lr
2e-4 / sqrt(d_sae / 2^14), 1000 warmup steps then linear decay, AuxK 1/32 after 10M tokens, i.e. not
within this run); lorascope runs the ``sae`` stage's ``Trainer`` with ``SaeSection`` defaults (k, the
expansion and the batch set below), then calibrates its threshold as the stage does.

Reported per scaling mode and trainer, on held-out documents, each SAE at its inference encoding
(lorascope: the calibrated threshold; SAELens: its JumpReLU threshold; sparsify: per-token TopK), and
lorascope also with BatchTopK at evaluation:

* planted directions recovered: a decoder row (in raw units) with cosine >= 0.9 to the planted raw
  direction, over all directions and over the frequent half;
* FVU in raw units (pooled over components: the large components dominate) and in per-component
  normalised units (each component divided by its RMS, the units ``scaling: per_component`` trains in);
* alive latents (fired on the held-out tokens), L0 on the held-out tokens;
* training tokens/s of each trainer's step at the trained state: the best of ``--rounds`` rounds of
  30 steps on the same batches, the trainers interleaved round by round (the machine's load moves).

Goals (issue 20): global scaling: FVU <= SAELens's and >= 40% of latents alive; per-component scaling:
>= 85% of the frequent half recovered and normalised FVU <= SAELens on the same normalised data;
tokens/s >= 4x SAELens.

Usage: OMP_NUM_THREADS=1 python benchmarks/sae_quality.py [--quick] [--tokens 1000000] [--epochs 1]
       [--spread 100] [--scaling both|global|per_component] [--trainers lorascope,saelens,sparsify]
       [--saelens-lr 1e-3] [--d-in 224] [--features 600]
       the issue-28 regime (several epochs, both at one lr, 100x scale spread, more directions than components):
       --epochs 3 --set lr=5e-4 --saelens-lr 5e-4 --scaling global  (about 10 minutes on one thread)
       [--set key=value ...]  (lorascope ``sae`` params overrides, to measure one change)
       (the peers need the `bench` extra: pip install -e ".[bench]")
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorascope.extract.store import Shard, Store, plan_shards
from lorascope.sae.params import SaeSection


# ------------------------------------------------------------------------------------ the data
@dataclass
class Planted:
    acts_TD: torch.Tensor
    """Raw adapter states (float16, as the store keeps them)."""
    dirs_ND: torch.Tensor
    """Planted directions in raw units (unit norm)."""
    freq_N: torch.Tensor
    """Firing probability per token of each direction."""


def planted(tokens: int, d_in: int, n_true: int, active: float, spread: float, seed: int = 20) -> Planted:
    """See the module docstring. Its own generator, never the SAEs' init seeds."""
    g = torch.Generator().manual_seed(seed)
    dirs_ND = torch.nn.functional.normalize(torch.randn(n_true, d_in, generator=g), dim=1)
    freq_N = (torch.arange(n_true) + 20.0) ** -1.0
    freq_N = (freq_N * active / freq_N.sum()).clamp(max=1.0)
    scale_D = torch.logspace(0, math.log10(spread), d_in)[torch.randperm(d_in, generator=g)]
    offset_D = 0.5 * torch.randn(d_in, generator=g)
    # each direction fires on round(freq x tokens) tokens drawn uniformly (a token rarely twice)
    counts_N = (freq_N * tokens).round().long()
    rows = torch.randint(tokens, (int(counts_N.sum()),), generator=g)
    feats = torch.repeat_interleave(torch.arange(n_true), counts_N)
    coef = 0.25 + 1.75 * torch.rand(rows.numel(), generator=g)
    order = torch.argsort(rows)
    rows, feats, coef = rows[order], feats[order], coef[order]
    acts = torch.empty(tokens, d_in, dtype=torch.float16)
    bounds = torch.searchsorted(rows, torch.arange(0, tokens + 32768, 32768))
    for i, lo in enumerate(range(0, tokens, 32768)):
        n = min(32768, tokens - lo)
        e = slice(int(bounds[i]), int(bounds[i + 1]))
        code = torch.sparse_coo_tensor(
            torch.stack([rows[e] - lo, feats[e]]), coef[e], (n, n_true), check_invariants=False
        )
        x = torch.sparse.mm(code, dirs_ND) + offset_D + 0.05 * torch.randn(n, d_in, generator=g)
        acts[lo : lo + n] = (x * scale_D).half()
    return Planted(acts, torch.nn.functional.normalize(dirs_ND * scale_D, dim=1), freq_N)


@dataclass
class PlantedStore(Store):
    """An activation store held in memory: what ``Trainer`` and the held-out helpers read."""

    acts_TD: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    @classmethod
    def build(cls, acts_TD: torch.Tensor, doc_len: int = 1000, shard_tokens: int = 131072) -> PlantedStore:
        lengths = [doc_len] * (acts_TD.shape[0] // doc_len)
        shards = plan_shards(lengths, shard_tokens)
        index = {
            "source": "lora",
            "components": [f"L{i // 7}.c{i % 7}" for i in range(acts_TD.shape[1])],
            "modules": [
                {"layer": i // 7, "kind": f"c{i % 7}", "module": "m", "width": 1}
                for i in range(acts_TD.shape[1])
            ],
            "dtype": "float16",
            "tokens": sum(lengths),
            "documents": [[f"doc{i}", i * doc_len, doc_len] for i in range(len(lengths))],
            "shards": [s.to_json() for s in shards],
            "special_token_ids": [],
        }
        return cls(Path("<planted>"), index, acts_TD)

    def read(self, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        acts = self.acts_TD[shard.start : shard.start + shard.tokens]
        return acts, torch.ones(shard.tokens, dtype=torch.int32)


# -------------------------------------------------------------------------------- the trainers
@dataclass
class Trained:
    """A trained SAE: what evaluation needs (in raw input units) and its training step."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    W_dec_FD: torch.Tensor
    step: Callable[[torch.Tensor], None]
    """One more training step on a batch in the training (scaled) units: for the timing rounds."""
    seconds: float
    """Wall time of the whole training loop."""
    extra: dict[str, Any] = field(default_factory=dict)


def lorascope_trainer(store: Store, held: torch.Tensor, cfg: SaeSection) -> Trained:
    from lorascope.sae.train import Trainer, calibrate, fold, heldout_batches, train_step

    trainer = Trainer(store, held, cfg)
    mse: list[float] = []
    t0 = time.perf_counter()
    trainer.run(on_step=lambda step, m: mse.append(m["mse"]))
    seconds = time.perf_counter() - t0
    raw = fold(trainer.sae, trainer.scale_D).eval()
    threshold, _ = calibrate(raw, heldout_batches(store, held, 0, cfg.calibration_tokens), cfg.k)
    raw.threshold.fill_(threshold)

    def batch_topk(x_BD: torch.Tensor) -> torch.Tensor:  # BatchTopK at evaluation, training batch size
        out = torch.zeros(x_BD.shape[0], raw.d_sae)
        for lo in range(0, x_BD.shape[0], cfg.batch_size):
            sel = raw.select(x_BD[lo : lo + cfg.batch_size], cfg.k)
            out[lo : lo + cfg.batch_size][sel.rows_N, sel.latents_N] = sel.values_N.detach()
        return out

    def step(x_BD: torch.Tensor) -> None:  # Trainer.run's step
        train_step(trainer.sae, trainer.opt, x_BD, trainer.since_fired_F, trainer.plan.dead_window, cfg.aux_k,
                   cfg.aux_coef)  # fmt: skip
        trainer.sched.step()

    n = len(mse)
    window = max(1, n // 20)
    curve = [sum(mse[i - window : i]) / window for i in (n // 2, int(0.8 * n), n)]
    return Trained(raw.encode, raw.decode, raw.W_dec_FD.detach(), step, seconds,
                   {"batch_topk": batch_topk, "mse_curve": curve})  # fmt: skip


def stream(
    store: Store, held: torch.Tensor, cfg: SaeSection, scale_D: torch.Tensor, steps: int
) -> Iterator[torch.Tensor]:
    """The batches lorascope's trainer sees, in the same order, divided by the same scale."""
    from lorascope.sae.data import TokenStream

    batches = iter(TokenStream(store, held, cfg.batch_size, cfg.seed))
    for _ in range(steps):
        yield next(batches) / scale_D


def saelens_trainer(store: Store, held: torch.Tensor, cfg: SaeSection, scale_D: torch.Tensor, mean_D: torch.Tensor,
                    steps: int, lr: float = 3e-4) -> Trained:  # fmt: skip
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    d_in, d_sae = scale_D.numel(), cfg.expansion * scale_D.numel()
    torch.manual_seed(0)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=cfg.k))
    sae.b_dec.data.copy_(mean_D / scale_D)  # the same b_dec init as lorascope's
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(d_sae, dtype=torch.long)  # in steps, as its trainer counts
    n = [0]

    def step(x: torch.Tensor) -> None:  # its trainer's step: forward pass, AuxK on its dead mask, Adam
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=since_fired > 1000,
                n_training_steps=n[0],
                is_logging_step=False,
            )  # fmt: skip
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        since_fired.add_(1)
        since_fired[(out.feature_acts > 0).any(0)] = 0
        n[0] += 1

    t0 = time.perf_counter()
    for x in stream(store, held, cfg, scale_D, steps):
        step(x)
    seconds = time.perf_counter() - t0
    W_dec = sae.W_dec.detach().clone()
    norm_F = W_dec.norm(dim=1)
    threshold = float(sae.topk_threshold)
    W_enc, b_enc, b_dec = (t.detach().clone() for t in (sae.W_enc, sae.b_enc, sae.b_dec))

    @torch.no_grad()
    def encode(x_BD: torch.Tensor) -> torch.Tensor:  # its inference JumpReLU (threshold on acts x ||W_dec||)
        pre = ((x_BD / scale_D - b_dec) @ W_enc + b_enc) * norm_F
        return pre * (pre > threshold)

    @torch.no_grad()
    def batch_topk(x_BD: torch.Tensor) -> torch.Tensor:  # its training encoding, batches of the training size
        return torch.cat([sae.encode(x / scale_D) for x in x_BD.split(cfg.batch_size)])

    def decode(f_BF: torch.Tensor) -> torch.Tensor:
        return ((f_BF @ (W_dec / norm_F[:, None])) + b_dec) * scale_D

    return Trained(encode, decode, W_dec * scale_D, step, seconds, {"batch_topk": batch_topk})


def sparsify_trainer(store: Store, held: torch.Tensor, cfg: SaeSection, scale_D: torch.Tensor, mean_D: torch.Tensor,
                     steps: int) -> Trained:  # fmt: skip
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    d_in, d_sae = scale_D.numel(), cfg.expansion * scale_D.numel()
    torch.manual_seed(0)
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=cfg.k), device="cpu")
    sae.b_dec.data.copy_(mean_D / scale_D)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (d_sae / 2**14) ** 0.5)
    sched = get_linear_schedule_with_warmup(opt, min(1000, steps // 10), steps)
    since_fired = torch.zeros(d_sae, dtype=torch.long)

    def step(x: torch.Tensor) -> None:  # its trainer's Adam step with the unit-norm decoder
        dead = since_fired >= 10_000_000
        out = sae(x, dead_mask=dead)
        loss = out.fvu + (out.auxk_loss / 32 if dead.any() else 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sched.step() if sched.last_epoch < steps else None
        sae.set_decoder_norm_to_unit_norm()
        since_fired.add_(x.shape[0])
        since_fired[torch.bincount(out.latent_indices.flatten(), minlength=d_sae) > 0] = 0

    t0 = time.perf_counter()
    for x in stream(store, held, cfg, scale_D, steps):
        step(x)
    seconds = time.perf_counter() - t0
    W_enc, b_enc = sae.encoder.weight.detach().clone(), sae.encoder.bias.detach().clone()
    W_dec, b_dec = sae.W_dec.detach().clone(), sae.b_dec.detach().clone()

    @torch.no_grad()
    def encode(x_BD: torch.Tensor) -> torch.Tensor:  # per-token TopK, its inference
        pre = torch.relu((x_BD / scale_D - b_dec) @ W_enc.T + b_enc)
        top = pre.topk(cfg.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, top.indices, top.values)

    def decode(f_BF: torch.Tensor) -> torch.Tensor:
        return (f_BF @ W_dec + b_dec) * scale_D

    return Trained(encode, decode, W_dec * scale_D, step, seconds)


def timing_rounds(trained: dict[str, Trained], batches: list[torch.Tensor], rounds: int) -> dict[str, float]:
    """Tokens/s per trainer: its best time for ``batches`` over ``rounds``, the trainers interleaved
    round by round (on a shared machine the best round is the least disturbed one, for each alike)."""
    times: dict[str, list[float]] = {name: [] for name in trained}
    for _ in range(rounds):
        for name, t in trained.items():
            t0 = time.perf_counter()
            for x in batches:
                t.step(x)
            times[name].append(time.perf_counter() - t0)
    tokens = sum(x.shape[0] for x in batches)
    return {name: tokens / min(ts) for name, ts in times.items()}


# ---------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def measure(trained: Trained, encode: Callable[[torch.Tensor], torch.Tensor], heldout_TD: torch.Tensor,
            rms_D: torch.Tensor, data: Planted) -> dict[str, float]:  # fmt: skip
    err_D = torch.zeros(heldout_TD.shape[1], dtype=torch.float64)
    l0, fired_F = 0.0, None
    for x in heldout_TD.split(4096):
        f = encode(x)
        err_D += (trained.decode(f) - x).double().square().sum(0)
        l0 += float((f > 0).sum())
        fired_F = (f > 0).any(0) if fired_F is None else fired_F | (f > 0).any(0)
    var_D = heldout_TD.double().var(0, correction=0) * heldout_TD.shape[0]
    w_D = 1 / rms_D.double().square()
    cos_NF = data.dirs_ND @ torch.nn.functional.normalize(trained.W_dec_FD, dim=1).T
    found_N = cos_NF.max(1).values >= 0.9
    frequent = data.freq_N >= data.freq_N.median()
    return {
        "recovered": float(found_N.float().mean()),
        "recovered_frequent": float(found_N[frequent].float().mean()),
        "fvu_raw": float(err_D.sum() / var_D.sum()),
        "fvu_normalised": float((err_D * w_D).sum() / (var_D * w_D).sum()),
        "alive": int(fired_F.sum()),
        "l0": l0 / heldout_TD.shape[0],
    }


def parse_set(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tokens", type=int, default=1_000_000, help="distinct training tokens (5%% more are held out)"
    )
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--d-in", type=int, default=224)
    p.add_argument("--features", type=int, default=600)
    p.add_argument("--active", type=float, default=9.0)
    p.add_argument(
        "--spread", type=float, default=100.0, help="largest / smallest component scale (1 = equal)"
    )
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--scaling", default="both", choices=["both", "global", "per_component"])
    p.add_argument("--trainers", default="lorascope,saelens,sparsify")
    p.add_argument(
        "--saelens-lr", type=float, default=None,
        help="also train SAELens at this learning rate (default: lorascope's lr, so the two meet at equal settings)",
    )  # fmt: skip
    p.add_argument("--set", nargs="*", default=[], help="lorascope sae params, e.g. aux_coef=0.1")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds of 30 steps each")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a smoke run: 60k tokens, d_in 64, 128 directions")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.d_in, args.features, args.active, args.rounds = 60_000, 64, 128, 4.0, 2
    torch.set_num_threads(args.threads)

    from lorascope.sae.data import heldout_documents, scan
    from lorascope.sae.train import input_scale

    t0 = time.perf_counter()
    data = planted(
        int(args.tokens / 0.95) // 1000 * 1000 + 1000, args.d_in, args.features, args.active, args.spread
    )
    store = PlantedStore.build(data.acts_TD)
    held = heldout_documents(store, 0.05)
    held_T = torch.repeat_interleave(held, 1000)
    heldout_TD = data.acts_TD[: held_T.numel()][held_T].float()
    stats = scan(store, held, False)
    d_sae = args.expansion * args.d_in
    print(f"planted: {stats.tokens:,} training + {heldout_TD.shape[0]:,} held-out tokens, d_in {args.d_in}, "
          f"{args.features} directions firing on {float(data.freq_N.max()):.1%} to {float(data.freq_N.min()):.2%} "
          f"of the tokens ({float(data.freq_N.sum()):.1f} per token), component scales spread {args.spread:g}x "
          f"(generated in {time.perf_counter() - t0:.0f} s)")  # fmt: skip
    print(f"k {args.k}, d_sae {d_sae}, batch {args.batch}, {args.epochs:g} epoch(s), {args.threads} thread(s); "
          f"lorascope overrides: {args.set or 'none'}", flush=True)  # fmt: skip
    modes = ["global", "per_component"] if args.scaling == "both" else [args.scaling]
    head = (f"{'scaling':<14}{'trainer':<36}{'recovered':>10}{'frequent':>10}{'FVU raw':>9}{'FVU norm':>9}"
            f"{'alive':>13}{'L0':>7}{'tokens/s':>10}")  # fmt: skip
    rows = []
    for mode in modes:
        cfg = SaeSection(**{"k": args.k, "expansion": args.expansion, "batch_size": args.batch, "epochs": args.epochs,
                            "scaling": mode, "kl_sequences": 0, "device": "cpu",
                            "exclude": {"first_position": False, "special_tokens": False}, **parse_set(args.set)})  # fmt: skip
        scale_D = input_scale(cfg, stats.rms_D, stats.mean_sq_norm)
        steps = int(cfg.epochs * stats.tokens) // cfg.batch_size
        trained: dict[str, Trained] = {}
        evals: list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]] = []
        saelens_lr = args.saelens_lr or cfg.lr  # SAELens at lorascope's own lr as well as at its default
        names = args.trainers.split(",") + (["saelens-lr"] if "saelens" in args.trainers else [])
        for name in names:
            t0 = time.perf_counter()
            if name == "lorascope":
                t = trained[name] = lorascope_trainer(store, held, cfg)
                evals += [(name, "lorascope (threshold)", t.encode), (name, "lorascope (BatchTopK at eval)", t.extra["batch_topk"])]  # fmt: skip
                curve = ", ".join(f"{v:.3g}" for v in t.extra["mse_curve"])
                print(f"  lorascope training MSE at 50% / 80% / 100% of the steps: {curve}", flush=True)
            elif name in ("saelens", "saelens-lr"):
                lr = 3e-4 if name == "saelens" else saelens_lr
                t = trained[name] = saelens_trainer(store, held, cfg, scale_D, stats.mean_D, steps, lr)
                label = "SAELens" if name == "saelens" else f"SAELens lr {lr:g}"
                evals += [(name, f"{label} (threshold)", t.encode), (name, f"{label} (BatchTopK at eval)", t.extra["batch_topk"])]  # fmt: skip
            elif name == "sparsify":
                t = trained[name] = sparsify_trainer(store, held, cfg, scale_D, stats.mean_D, steps)
                evals.append((name, "sparsify TopK", t.encode))
            else:
                raise SystemExit(f"--trainers: unknown trainer {name!r} (lorascope, saelens, sparsify)")
            print(f"  {name}: trained in {trained[name].seconds:.0f} s ({steps} steps; "
                  f"{time.perf_counter() - t0:.0f} s with calibration)", flush=True)  # fmt: skip
        measured = [
            (name, label, measure(trained[name], encode, heldout_TD, stats.rms_D, data))
            for name, label, encode in evals
        ]
        timing = stream(store, held, cfg, scale_D, 30)
        speed = timing_rounds(trained, list(timing), args.rounds)
        print(head)
        for name, label, m in measured:
            rows.append((mode, label, m, speed[name]))
            print(f"{mode:<14}{label:<36}{m['recovered']:>10.1%}{m['recovered_frequent']:>10.1%}"
                  f"{m['fvu_raw']:>9.4f}{m['fvu_normalised']:>9.4f}{m['alive']:>7,}/{d_sae:<5,}{m['l0']:>7.2f}"
                  f"{speed[name]:>10,.0f}", flush=True)  # fmt: skip
    by = {(r[0], r[1]): r for r in rows}
    for mode in modes:
        ours, lens = by.get((mode, "lorascope (threshold)")), by.get((mode, "SAELens (threshold)"))
        if ours and lens:
            key = "fvu_raw" if mode == "global" else "fvu_normalised"
            print(f"{mode}: lorascope / SAELens {key} {ours[2][key] / lens[2][key]:.2f}x (goal <= 1), tokens/s "
                  f"{ours[3] / lens[3]:.2f}x (goal >= 4); lorascope alive {ours[2]['alive'] / d_sae:.0%}"
                  f"{' (goal >= 40%)' if mode == 'global' else ''}, frequent half recovered "
                  f"{ours[2]['recovered_frequent']:.0%}{' (goal >= 85%)' if mode == 'per_component' else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
