"""Attribution screening vs exact ablation: how much cheaper the screen ranks every unit, and how well.

One process, one randomly initialised Qwen2 (fp32, the same random rank-1 LoRA on all seven projections as
``benchmarks/ablate.py`` builds) and one random SAE over its adapter state, over the same random token
sequences (response from token ``--first``). Units: every component and every SAE latent. Two ways to get
each unit's ΔCE on the response tokens:

  (a) exact: ``attribute.measure.exact``, one unablated pass, then one forward row per unit (batches of
      ``--batch``): units + 1 forward passes per sequence;
  (b) screen: ``attribute.measure.screen`` with ``--groups`` groups per kind and ``--steps`` midpoints: 1 +
      2 x groups x steps forward+backward passes per sequence, whatever the number of units.

Printed: each one's wall clock over all sequences (best of ``--repeats`` rounds, order rotating), the
ratio, the pass counts and their ratio, and the Spearman correlation of (b) with (a) over the components
and over every unit. The issue's goal: the paper profile's 448 components screened in <= 3 passes' time,
>= 100x fewer forward passes than exact.

Usage: python benchmarks/attribute.py [--layers 8] [--hidden 256] [--intermediate 1024] [--heads 4]
       [--kv-heads 2] [--vocab 4096] [--latents 512] [--sequences 2] [--tokens 256] [--first 32]
       [--groups 8] [--steps 2] [--batch 16] [--threads 2] [--repeats 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablate import build_model  # noqa: E402  (the same random model as the ablation benchmark)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("layers", 8), ("hidden", 256), ("intermediate", 1024), ("heads", 4), ("kv-heads", 2),
                          ("vocab", 4096), ("latents", 512), ("sequences", 2), ("tokens", 256), ("first", 32),
                          ("groups", 8), ("steps", 2), ("batch", 16), ("threads", 2), ("repeats", 2), ("seed", 0)):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from lorascope.attribute.hooks import State
    from lorascope.attribute.measure import exact, screen
    from lorascope.attribute.stage import spearman
    from lorascope.attribute.units import component_units, latent_units
    from lorascope.components import lora_components
    from lorascope.sae.model import BatchTopKSAE

    model = build_model(args).requires_grad_(False)
    comps = lora_components(model)
    sae = BatchTopKSAE(
        sum(c.width for c in comps), args.latents, 16, generator=torch.Generator().manual_seed(args.seed)
    )
    sae.requires_grad_(False)
    units = component_units(comps) + latent_units(range(args.latents))
    gen = torch.Generator().manual_seed(args.seed)
    seqs = [torch.randint(0, args.vocab, (1, args.tokens), generator=gen) for _ in range(args.sequences)]
    state = State(model, comps)
    best: dict[str, float] = {}
    results: dict[str, dict[str, float]] = {"exact": {}, "screen": {}}

    def run_exact() -> None:
        for ids in seqs:
            d, _ = exact(state, model, sae, units, ids, args.first, args.batch)
            for k, v in d.items():
                results["exact"][k] = results["exact"].get(k, 0.0) + v

    def run_screen() -> None:
        for ids in seqs:
            _, v = screen(state, model, sae, units, ids, args.first, args.groups, args.steps, args.seed)
            for u, x in zip(units, v, strict=True):
                results["screen"][u.name] = results["screen"].get(u.name, 0.0) + x

    with state.attach():
        for r in range(args.repeats):
            order = [("exact", run_exact), ("screen", run_screen)]
            for name, fn in order[r % 2 :] + order[: r % 2]:
                results[name] = {}
                t = time.perf_counter()
                fn()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    n_exact, n_screen = len(units) + 1, 1 + 2 * args.groups * args.steps
    names = [u.name for u in units]
    comp_names = [u.name for u in units if u.kind == "component"]
    rho_all = spearman([results["screen"][n] for n in names], [results["exact"][n] for n in names])
    rho_comp = spearman([results["screen"][n] for n in comp_names], [results["exact"][n] for n in comp_names])
    print(
        f"units: {len(comp_names)} components + {args.latents} latents; {args.sequences} sequences x {args.tokens} tokens"
    )
    print(f"exact:  {best['exact']:.2f} s  ({n_exact} forwards per sequence)")
    print(
        f"screen: {best['screen']:.2f} s  ({n_screen} forward+backward passes per sequence; groups {args.groups}, steps {args.steps})"
    )
    print(f"ratio: {best['exact'] / best['screen']:.1f}x faster; {n_exact / n_screen:.1f}x fewer passes")
    print(f"spearman vs exact: components {rho_comp:.3f}, all units {rho_all:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
