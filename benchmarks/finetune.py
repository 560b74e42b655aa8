"""Tokens per second of the LoRA training step, side by side with the full-finetune step.

Both steps run on the same randomly initialised Qwen2 of Qwen2.5-0.5B widths (hidden 896, MLP 4864,
14 heads, 2 KV heads); on CPU the depth, vocabulary and sequence are cut so the run takes a minute.
On a CUDA device it also prints the bf16 MFU: model FLOPs per token are 6N for the full step and
4N for the LoRA step (no weight gradients for the frozen base), N = non-embedding parameters.

Usage: python benchmarks/finetune.py [--layers 24] [--vocab 151936] [--seq 2048] [--batch 4]
       [--steps 10] [--peak-tflops 989] [--no-checkpointing]
"""

from __future__ import annotations

import argparse
import time

import torch


def build(args: argparse.Namespace, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=args.vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=max(args.seq, 2048),
        tie_word_embeddings=True, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)


def time_steps(model: torch.nn.Module, args: argparse.Namespace, device: str) -> float:
    """Tokens per second over ``args.steps`` optimizer steps after two warm-up steps."""
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    for i in range(args.steps + 2):
        if i == 2:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch * args.seq / (time.perf_counter() - t0)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24 if cuda else 4)
    p.add_argument("--vocab", type=int, default=151936 if cuda else 32768)
    p.add_argument("--seq", type=int, default=2048 if cuda else 256)
    p.add_argument("--batch", type=int, default=4 if cuda else 2)
    p.add_argument("--steps", type=int, default=10 if cuda else 3)
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)"
    )
    p.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)

    from peft import get_peft_model

    from lorascope.finetune.adapter import lora_config
    from lorascope.finetune.params import LoraAdapter

    results = {}
    for variant in ("lora", "full"):
        model = build(args, device, dtype)
        n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
        if variant == "lora":
            model = get_peft_model(model, lora_config(LoraAdapter(r=1), model))
        results[variant] = (time_steps(model, args, device), n)
        del model
        if cuda:
            torch.cuda.empty_cache()

    where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{where}: layers {args.layers}, vocab {args.vocab}, seq {args.seq}, batch {args.batch}, "
          f"{'no ' if args.no_checkpointing else ''}gradient checkpointing, {dtype}")  # fmt: skip
    for variant, (tps, n) in results.items():
        line = f"{variant:>5} step: {tps:10.0f} tokens/s"
        if cuda:
            flops_per_token = (4 if variant == "lora" else 6) * n
            line += f"   MFU {tps * flops_per_token / (args.peak_tflops * 1e12):6.1%}"
        print(line)
    print(f"LoRA / full tokens per second: {results['lora'][0] / results['full'][0]:.2f}x")


if __name__ == "__main__":
    main()
