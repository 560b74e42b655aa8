"""Ablation sweep throughput: lorascope's prefix reuse + batching vs one full forward per ablation.

All configurations run in one process on the same randomly initialised Qwen2 (fp32, ``--layers`` >= 8
decoder layers) with the same random rank-1 LoRA on all seven projections (lora_B non-zero, so every
ablation moves the output), over the same random token sequences (response from token ``--first``),
and measure the full sweep (every component, every layer, every type, the attn / mlp / all groups):

  (a) naive: ``Ablator(batch_size=1, prefix_reuse=False)``, a full ``model(input_ids=...)`` forward per
      ablation with logits at every position, then KL / CE at the response positions;
  (b) lorascope: ``Ablator(batch_size=--batch, prefix_reuse=True)``, one recorded unablated pass, then
      each batch of ablations runs from its first changed layer, logits only at response positions;
  (c) prefix reuse alone: ``Ablator(batch_size=1, prefix_reuse=True)``, to split (b)'s gain in two.

Each Ablator gets one warm-up call on a short input; then ``--repeats`` times over the sequences, each
sequence is one round in which every configuration runs the whole sweep in turn (order rotating per
round, so a busy machine slows them alike). The figure is each configuration's wall clock
(``time.perf_counter``) for the sweep over all sequences, each sequence at its fastest round ("best";
robust to other processes sharing the cores), the medians and the per-round ratios beside it.

The check line compares the per-token mean KL of every ablation with (a)'s (max abs difference, must
be <= --tol, else exit 1). The bound line counts decoder-layer passes: ``layers * (ablations + 1)``
for (a) against ``layers + sum over ablations of (layers - first changed layer)`` for (b) and (c):
the speed-up layer-level prefix reuse alone gives where decoder layers are all the time (as on a
compute-bound CPU; batching adds to it where per-forward overhead counts, e.g. on a GPU or with short
sequences). Goal: (a) / (b) >= 1.8x with equal KL.

Usage: python benchmarks/ablate.py [--layers 16] [--hidden 256] [--intermediate 1024] [--heads 4]
       [--kv-heads 2] [--vocab 4096] [--sequences 2] [--tokens 256] [--first 32] [--batch 8]
       [--logit-chunk 512] [--threads 2] [--repeats 2] [--seed 0] [--tol 1e-5] [--no-prefix-only]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch


def build_model(args: argparse.Namespace) -> Any:
    """A random Qwen2 with a random rank-1 rsLoRA (alpha 16) on all seven projections, in eval mode."""
    from peft import get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lorascope.finetune.adapter import lora_config
    from lorascope.finetune.params import LoraAdapter

    cfg = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.tokens), tie_word_embeddings=True, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(cfg).float()
    peft_model = get_peft_model(
        model, lora_config(LoraAdapter(r=1, alpha=16, use_rslora=True, dropout=0.0), model)
    )
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():  # a fresh LoRA has B = 0: every ablation would be a no-op (KL 0)
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    return peft_model.eval()


def interleaved(
    ablators: dict[str, Any], seqs: list[torch.Tensor], first: int, ablations: list[Any], repeats: int
) -> tuple[dict[str, list[list[float]]], dict[str, list[Any]]]:
    """Seconds of each configuration per sequence per repeat (``[sequence][repeat]``) and its ``(lora,
    stats)`` per sequence. Each (sequence, repeat) is one round in which every configuration runs the
    whole sweep in turn, the order rotating from round to round, so a busy machine slows them alike."""
    names = list(ablators)
    seconds: dict[str, list[list[float]]] = {n: [[] for _ in seqs] for n in names}
    results: dict[str, list[Any]] = {n: [None] * len(seqs) for n in names}
    rounds = [(s, r) for r in range(repeats) for s in range(len(seqs))]
    for k, (s, _) in enumerate(rounds):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            t0 = time.perf_counter()
            results[name][s] = ablators[name].measure(seqs[s], first, ablations)
            seconds[name][s].append(time.perf_counter() - t0)
    return seconds, results


def max_kl_diff(a: list[Any], b: list[Any]) -> float:
    """Max over sequences and ablations of |per-token mean KL of a - of b|."""
    return max(
        abs(sa.kl_sum / sa.tokens - sb.kl_sum / sb.tokens)
        for (_, stats_a), (_, stats_b) in zip(a, b, strict=True)
        for sa, sb in zip(stats_a, stats_b, strict=True)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument(
        "--first", type=int, default=32, help="first response token (KL / CE over first..tokens-1)"
    )
    p.add_argument("--batch", type=int, default=8, help="ablations per forward for lorascope")
    p.add_argument("--logit-chunk", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="rounds per sequence; each one's fastest counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-5, help="max allowed |per-token mean KL difference|")
    p.add_argument("--no-prefix-only", action="store_true", help="skip (c), prefix reuse with batch 1")
    args = p.parse_args()
    if args.layers < 8:
        p.error("--layers must be >= 8")
    if args.repeats < 1 or args.sequences < 1:
        p.error("--repeats and --sequences must be >= 1")
    if not 1 <= args.first < args.tokens:
        p.error("--first must be in 1..tokens-1")
    torch.set_num_threads(args.threads)

    from lorascope.ablate.runner import Ablator
    from lorascope.ablate.targets import sweeps
    from lorascope.components import lora_components

    model = build_model(args)
    comps = lora_components(model)
    ablations = sweeps(comps, ["components", "layers", "types", "groups"], {})
    g = torch.Generator().manual_seed(args.seed + 2)
    seqs = [torch.randint(0, args.vocab, (args.tokens,), generator=g) for _ in range(args.sequences)]
    warm_ids = torch.randint(0, args.vocab, (args.first + 8,), generator=g)

    configs = {
        "naive (full forward, batch 1)": Ablator(model, comps, 1, args.logit_chunk, prefix_reuse=False),
        f"lorascope (prefix, batch {args.batch})": Ablator(model, comps, args.batch, args.logit_chunk, True),
    }
    if not args.no_prefix_only:
        configs["prefix reuse only (batch 1)"] = Ablator(model, comps, 1, args.logit_chunk, prefix_reuse=True)
    for ablator in configs.values():  # lazy init (kernels, rotary caches, hooks) outside the timings
        ablator.measure(warm_ids, args.first, ablations[:: max(1, len(ablations) // 16)])

    n_layers = args.layers
    runs = n_layers * (len(ablations) + 1)  # + 1: the unablated pass for P_lora
    runs_prefix = n_layers + sum(n_layers - a.start_layer(comps) for a in ablations)
    print(
        f"layers {n_layers}  hidden {args.hidden}  vocab {args.vocab}  components {len(comps)}  "
        f"ablations {len(ablations)}  sequences {args.sequences} x {args.tokens} tokens "
        f"(response {args.tokens - args.first})  threads {args.threads}"
    )
    seconds, results = interleaved(configs, seqs, args.first, ablations, args.repeats)
    names = list(configs)
    reference = results[names[0]]
    best = {n: sum(min(t) for t in seconds[n]) for n in names}  # the sweep once, each sequence's fastest
    median = {n: sum(statistics.median(t) for t in seconds[n]) for n in names}
    print(f"{'configuration':<34}{'best s':>9}{'median s':>10}{'ablations/s':>13}{'max |dKL|':>11}")
    for n in names:
        rate = len(ablations) * args.sequences / best[n]
        print(
            f"{n:<34}{best[n]:>9.2f}{median[n]:>10.2f}{rate:>13.1f}{max_kl_diff(results[n], reference):>11.2e}"
        )

    kl_mean = max(s.kl_sum / s.tokens for _, stats in reference for s in stats)
    worst = max(max_kl_diff(r, reference) for r in results.values())
    print(
        f"decoder-layer passes: naive {runs}, prefix reuse {runs_prefix} "
        f"-> layer-level bound {runs / runs_prefix:.2f}x (lm_head, KL and Python overhead not counted)"
    )
    print(
        f"KL check: max |per-token mean KL - naive| {worst:.2e} (tol {args.tol:g}; largest mean KL {kl_mean:.3f})"
    )
    naive, ours = names[:2]
    rounds = [
        a / b
        for ta, tb in zip(seconds[naive], seconds[ours], strict=True)
        for a, b in zip(ta, tb, strict=True)
    ]
    print(
        f"speed-up naive / lorascope: {best[naive] / best[ours]:.2f}x on the best times (goal >= 1.8); "
        f"{median[naive] / median[ours]:.2f}x on the medians; per round "
        + " ".join(f"{x:.2f}x" for x in rounds)
    )
    if worst > args.tol:
        print(f"FAILED: KL differs from the naive path by {worst:.2e} > {args.tol:g}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
