"""The real-scale GPU check in one script (< 5 minutes on one H100 / H200): every hot path in bf16.

Models are randomly initialised (no hub): Qwen2.5-0.5B's config (hidden 896, MLP 4864, 24 layers,
14 heads, 2 KV heads, vocab 151936, tied) and a 2-layer slice of Qwen2.5-32B's widths (hidden 5120,
MLP 27648, 40 heads, 8 KV heads, vocab 152064, untied), each with a random rank-1 rsLoRA (alpha 16) on
all seven projections (lora_B non-zero). Rows:

* LoRA finetune step (bf16 autocast over bf16 weights, float32 adapter, gradient checkpointing,
  AdamW): tokens/s and MFU = tokens/s x 4N / peak (no weight gradients for the frozen base);
* full finetune step, same settings, every weight trained (bf16 weights and Adam moments): 6N;
* extraction: lorascope's ``Extractor.run`` on the merged fast path (projection in float32) over
  packed documents, vs a plain bf16 forward of the same decoder on the same batches: the ratio;
* SAE training (lorascope's sparse BatchTopK step): 448 -> 3584, k 16, batch 4096: tokens/s;
* contexts encoding: lorascope's ``Selector.update`` over a shard of 448 adapter states, encoded with
  an SAE of 3584 latents on the device (top-k, quantile and random samples, windows): tokens/s;
* ablation sweep (every component, layer, type and group) with prefix reuse and batching vs a full
  forward per ablation: the ratio;
* peak device memory of each row (``torch.cuda.max_memory_allocated``; "-" on the CPU).

N counts the matmul weights a token passes through (every layer's projections and the LM head; not
the embedding lookup) plus causal attention (2 x layers x seq x hidden per token forward). Goals on a
GPU: LoRA step >= 40% MFU at the 32B slice, extraction >= 0.95x a plain bf16 forward, SAE >= 1M tokens/s.

It imports lorascope's own code paths (``src/`` is put on ``sys.path``; only torch, transformers, peft,
safetensors and lorascope's light modules are loaded: no mlflow, dvc or lm-eval).

Usage: python benchmarks/gpu.py [--small] [--peak-tflops 989] [--only lora,full,extract,sae,contexts,ablate]
  --small: cut-down models and sizes (about a minute on a CPU) to show the script works.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS: list[dict[str, str]] = []


# ------------------------------------------------------------------------------------------ set-up
def configs(small: bool) -> dict[str, dict[str, Any]]:
    if small:
        return {
            "0.5B-shaped (small)": dict(hidden=128, inter=512, layers=4, heads=4, kv=2, vocab=4096, tie=True),
            "32B-slice-shaped (small)": dict(
                hidden=320, inter=1728, layers=2, heads=5, kv=1, vocab=8192, tie=False
            ),
        }
    return {
        "Qwen2.5-0.5B": dict(hidden=896, inter=4864, layers=24, heads=14, kv=2, vocab=151936, tie=True),
        "Qwen2.5-32B 2-layer slice": dict(
            hidden=5120, inter=27648, layers=2, heads=40, kv=8, vocab=152064, tie=False
        ),
    }


def build(spec: dict[str, Any], device: torch.device, lora: bool, seed: int = 0) -> Any:
    """A random Qwen2 in bf16 on ``device``; with ``lora`` a random rank-1 rsLoRA on all projections
    (float32 adapter, B non-zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv"],
        max_position_embeddings=32768, tie_word_embeddings=spec["tie"], use_cache=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    if not lora:
        return model
    peft_model = get_peft_model(
        model, LoraConfig(r=1, lora_alpha=16, use_rslora=True, lora_dropout=0.0, target_modules=TARGETS)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.data = (torch.randn(p.shape, generator=gen) * (0.02 if "lora_A" in name else 0.002)).to(
                    device, torch.float32
                )
    return peft_model


def model_flops_per_token(spec: dict[str, Any], seq: int) -> float:
    """2 x (matmul weights a token passes through, LM head included) + causal attention, forward."""
    H, M, L, V = spec["hidden"], spec["inter"], spec["layers"], spec["vocab"]
    K = spec["kv"] * H // spec["heads"]
    layer = H * H + 2 * H * K + H * H + 3 * H * M
    return 2 * (L * layer + V * H) + 2 * L * seq * H


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "-"


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Seconds per call (best of ``repeats`` after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def row(what: str, model: str, figure: str, versus: str, memory: str, goal: str = "") -> None:
    ROWS.append(
        {"what": what, "model": model, "figure": figure, "versus": versus, "peak": memory, "goal": goal}
    )
    print(f"  {what} [{model}]: {figure}; {versus}; peak {memory} {goal}", flush=True)


# ---------------------------------------------------------------------------------------- training
def bench_train(
    spec: dict[str, Any], name: str, variant: str, args: argparse.Namespace, device: torch.device
) -> None:
    reset_peak(device)
    model = build(spec, device, lora=variant == "lora")
    model.train()
    base = model.get_base_model() if variant == "lora" else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant == "lora":
        base.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    seq, batch = args.seq, args.batch
    ids = torch.randint(0, spec["vocab"], (batch, seq), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(step, device, args.steps, warmup=2)
    tps = batch * seq / seconds
    fpt = model_flops_per_token(spec, seq) * (2 if variant == "lora" else 3)  # 4N lora, 6N full
    mfu = tps * fpt / (args.peak_tflops * 1e12) if args.peak_tflops else float("nan")
    goal = ""
    if variant == "lora" and "slice" in name and device.type == "cuda":
        goal = "(goal >= 40% MFU: " + ("met)" if mfu >= 0.40 else "NOT met)")
    mfu_text = f"MFU {mfu:.1%}" if args.peak_tflops else "MFU - (give --peak-tflops)"
    row(f"{variant} finetune step", name, f"{tps:,.0f} tokens/s", f"{mfu_text} (seq {seq} x batch {batch})",
        peak(device), goal)  # fmt: skip


# -------------------------------------------------------------------------------------- extraction
def bench_extract(spec: dict[str, Any], name: str, args: argparse.Namespace, device: torch.device) -> None:
    from lorascope.components import lora_components
    from lorascope.extract.batching import padded_batches
    from lorascope.extract.extractor import Extractor
    from lorascope.extract.recorder import Recorder

    reset_peak(device)
    peft_model = build(spec, device, lora=True).eval()
    comps = lora_components(peft_model)
    base = peft_model.get_base_model()
    projections = {
        c.module: base.get_submodule(c.module).lora_A["default"].weight.detach().float().clone()
        for c in comps
    }
    merged = peft_model.merge_and_unload()
    extractor = Extractor(merged, Recorder(comps, projections), "merged", device)
    rng = random.Random(0)
    docs = [[rng.randrange(spec["vocab"]) for _ in range(rng.randint(args.doc_min, args.doc_max))]
            for _ in range(args.docs)]  # fmt: skip
    tokens = sum(map(len, docs))
    decoder = merged.get_decoder()

    def plain() -> None:
        with torch.inference_mode():
            for _, input_ids, mask in padded_batches(docs, args.batch_tokens):
                decoder(input_ids=input_ids.to(device), attention_mask=None if mask is None else mask.to(device),
                        use_cache=False)  # fmt: skip

    def ours() -> None:
        extractor.run(docs, args.batch_tokens, "float16")

    t_plain, t_ours = float("inf"), float("inf")
    plain(), ours()
    for _ in range(args.repeats):  # alternate, so a busy device slows both alike
        t_plain = min(t_plain, timed(plain, device, 1, warmup=0))
        t_ours = min(t_ours, timed(ours, device, 1, warmup=0))
    ratio = t_plain / t_ours
    goal = ("(goal >= 0.95x: " + ("met)" if ratio >= 0.95 else "NOT met)")) if device.type == "cuda" else ""
    row("extraction (merged, + store buffers)", name, f"{tokens / t_ours:,.0f} tokens/s",
        f"{ratio:.2f}x a plain bf16 forward ({tokens / t_plain:,.0f} tokens/s)", peak(device), goal)  # fmt: skip


# ------------------------------------------------------------------------------------- SAE, contexts
def synthetic_states(tokens: int, d_in: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Adapter-state-like data: 1-16 active planted directions per token plus noise."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(4 * d_in, d_in, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    out = torch.empty(tokens, d_in)
    for lo in range(0, tokens, 65536):
        n = min(65536, tokens - lo)
        coef = torch.rand(n, dirs.shape[0], generator=g) * (
            torch.rand(n, dirs.shape[0], generator=g) < 8 / dirs.shape[0]
        )
        out[lo : lo + n] = coef @ dirs + 0.05 * torch.randn(n, d_in, generator=g)
    return out.to(device)


def bench_sae(args: argparse.Namespace, device: torch.device) -> None:
    from lorascope.sae.model import BatchTopKSAE
    from lorascope.sae.train import train_step

    reset_peak(device)
    d_in, d_sae, k, batch = 448, 3584, 16, args.sae_batch
    data = synthetic_states(batch * 8, d_in, device)
    sae = BatchTopKSAE(d_in, d_sae, k, generator=torch.Generator().manual_seed(0)).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    since = torch.zeros(d_sae, dtype=torch.long, device=device)
    state = {"i": 0}

    def steps() -> None:
        for _ in range(args.sae_steps):
            lo = (state["i"] % 8) * batch
            train_step(sae, opt, data[lo : lo + batch], since, 10 * batch, 256, 1 / 32)
            state["i"] += 1

    seconds = timed(steps, device, 2, warmup=1)
    tps = args.sae_steps * batch / seconds
    goal = (
        ("(goal >= 1M tokens/s: " + ("met)" if tps >= 1e6 else "NOT met)")) if device.type == "cuda" else ""
    )
    row(
        "SAE training step",
        f"{d_in} -> {d_sae}, k {k}",
        f"{tps:,.0f} tokens/s",
        f"batch {batch}",
        peak(device),
        goal,
    )
    reset_peak(device)


def bench_contexts(args: argparse.Namespace, device: torch.device) -> None:
    from lorascope.contexts.params import ContextsSection
    from lorascope.contexts.selection import Selector, ShardView
    from lorascope.sae.model import BatchTopKSAE

    reset_peak(device)
    d_in, d_sae, tokens = 448, 3584, args.context_tokens
    sae = BatchTopKSAE(d_in, d_sae, 16, generator=torch.Generator().manual_seed(0)).to(device).eval()
    sae.threshold.fill_(0.05)
    acts = synthetic_states(tokens, d_in, device).to(torch.float16)
    ids = torch.randint(0, 151936, (tokens,), dtype=torch.int32, device=device)
    lengths = [1024] * (tokens // 1024) + ([tokens % 1024] if tokens % 1024 else [])
    view = ShardView.build(0, acts, ids, lengths)
    keys = torch.rand(tokens, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def encode(x: torch.Tensor) -> torch.Tensor:
        return sae.encode(x)

    def one() -> None:
        Selector(d_sae, (1,), ContextsSection(), device).update(view, encode, keys)

    seconds = timed(one, device, 1, warmup=1)
    row("contexts: SAE encode + select", f"{d_in} -> {d_sae} latents, top 64 + 50 + 10",
        f"{tokens / seconds:,.0f} tokens/s", f"{tokens * d_sae / seconds:.2e} activations/s", peak(device))  # fmt: skip
    reset_peak(device)


# ------------------------------------------------------------------------------------------ ablate
def bench_ablate(spec: dict[str, Any], name: str, args: argparse.Namespace, device: torch.device) -> None:
    from lorascope.ablate.runner import Ablator
    from lorascope.ablate.targets import sweeps
    from lorascope.components import lora_components

    reset_peak(device)
    model = build(spec, device, lora=True).eval()
    comps = lora_components(model)
    ablations = sweeps(comps, ["components", "layers", "types", "groups"], {})
    ids = torch.randint(0, spec["vocab"], (args.ablate_tokens,))
    first = args.ablate_tokens // 8
    fast = Ablator(model, comps, batch_size=8, logit_chunk=512, prefix_reuse=True)
    naive = Ablator(model, comps, batch_size=1, logit_chunk=512, prefix_reuse=False)
    fast.measure(ids[:64], 8, ablations[:2])
    naive.measure(ids[:64], 8, ablations[:2])
    t_fast = timed(lambda: fast.measure(ids, first, ablations), device, 1, warmup=0)
    t_naive = timed(lambda: naive.measure(ids, first, ablations), device, 1, warmup=0)
    row("ablation sweep (prefix reuse, batch 8)", name, f"{len(ablations) / t_fast:,.1f} ablations/s",
        f"{t_naive / t_fast:.2f}x a full forward per ablation ({len(ablations)} ablations, {args.ablate_tokens} tokens)",
        peak(device))  # fmt: skip


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="cut-down sizes: about a minute on a CPU")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak for the MFU (default on CUDA: 989, H100/H200 SXM)",
    )
    p.add_argument("--only", default="lora,full,extract,sae,contexts,ablate")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = 989.0
    small = args.small
    args.seq, args.batch, args.steps = (256, 2, 2) if small else (4096, 2, 5)
    args.docs, args.doc_min, args.doc_max = (24, 60, 240) if small else (96, 500, 4000)
    args.batch_tokens, args.repeats = (2048, 2) if small else (32768, 3)
    args.sae_batch, args.sae_steps = (4096, 5) if small else (4096, 200)
    args.context_tokens = 8192 if small else 262144
    args.ablate_tokens = 128 if small else 1024
    only = set(args.only.split(","))
    cfgs = configs(small)
    names = list(cfgs)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {gpu}, torch {torch.__version__}, bf16{', small sizes' if small else ''}", flush=True)
    started = time.perf_counter()
    for variant in ("lora", "full"):
        if variant in only:
            for name in names:
                bench_train(cfgs[name], name, variant, args, device)
    if "extract" in only:
        bench_extract(cfgs[names[0]], names[0], args, device)
    if "sae" in only:
        bench_sae(args, device)
    if "contexts" in only:
        bench_contexts(args, device)
    if "ablate" in only:
        bench_ablate(cfgs[names[0]], names[0], args, device)
    print("\n| row | model | figure | versus | peak memory |\n|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['what']} | {r['model']} | {r['figure']} {r['goal']} | {r['versus']} | {r['peak']} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s on {gpu}")


if __name__ == "__main__":
    main()
