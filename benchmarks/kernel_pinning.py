"""Which CPU kernel pinning makes the pipeline's float ops give the same bytes on another CPU, and what it costs.

    python benchmarks/kernel_pinning.py                 # op sweep native vs an emulated AMD EPYC, and the time cost
    python benchmarks/kernel_pinning.py --no-emulate    # time cost only

Each setting of the three variables ``lorascope.kernels`` pins (unpinned; ATen + oneDNN capped at AVX2;
plus ``MKL_CBWR=AVX2``; plus ``MKL_CBWR=COMPATIBLE``) runs the float ops the stages run (matmuls, attention,
activations, reductions, the optimisers, random init) in a child process, natively and under
``qemu-x86_64 -cpu EPYC-Rome`` (user-mode emulation of an AMD EPYC with AVX2 and no AVX-512, whose CPUID
MKL and ATen dispatch on: ``apt-get install qemu-user``), and prints the ops whose bytes differ between the
two. Then it times 60 pretraining steps of the tiny profile's model under each setting, natively.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

SETTINGS = {
    "unpinned": {},
    "aten+onednn avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "+ MKL_CBWR=AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
    "+ MKL_CBWR=COMPATIBLE (lorascope)": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_CBWR": "COMPATIBLE",
    },
}

OPS = r"""
import hashlib, json, sys, torch
F = torch.nn.functional
torch.manual_seed(0)
x = torch.randn(4096); p = x.abs() + 0.1; u = torch.rand(4096) * 1.8 - 0.9
m = x.view(64, 64); a = torch.randn(64, 300); b = torch.randn(300, 97); q = x.view(1, 4, 32, 32)
def adamw(**kw):
    torch.manual_seed(1)
    w = [torch.randn(64, 64, requires_grad=True), torch.randn(380, 64, requires_grad=True)]
    for t in w: t.grad = torch.randn_like(t) * 1e-3
    torch.optim.AdamW(w, lr=5e-3, weight_decay=0.01, **kw).step()
    return torch.cat([t.detach().flatten() for t in w])
ops = {
    "matmul 64x300x97": lambda: a @ b, "linear": lambda: F.linear(m, m), "bmm": lambda: torch.bmm(x.view(4, 32, 32), x.view(4, 32, 32)),
    "sdpa (causal)": lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True),
    "exp": lambda: x.exp(), "log": lambda: p.log(), "tanh": lambda: x.tanh(), "erf": lambda: x.erf(), "sin": lambda: x.sin(),
    "silu": lambda: F.silu(x), "gelu": lambda: F.gelu(x), "softmax": lambda: m.softmax(-1), "log_softmax": lambda: m.log_softmax(-1),
    "sqrt": lambda: p.sqrt(), "rsqrt": lambda: p.rsqrt(), "atan": lambda: x.atan(), "pow": lambda: p.pow(1.7),
    "sum / mean / norm": lambda: torch.stack([x.sum(), m.mean(-1).sum(), torch.linalg.vector_norm(x)]),
    "cross_entropy": lambda: F.cross_entropy(m, torch.arange(64)),
    "AdamW (foreach)": lambda: adamw(foreach=True), "AdamW (fused)": lambda: adamw(fused=True),
    "normal_ / uniform_": lambda: torch.cat([torch.empty(4096).normal_(), torch.empty(4096).uniform_()]),
    "bf16 matmul": lambda: (m.bfloat16() @ m.bfloat16()).float(), "fp16 matmul": lambda: (m.half() @ m.half()).float(),
}
out = {}
for k, f in ops.items():
    torch.manual_seed(2)
    out[k] = hashlib.md5(f().detach().contiguous().numpy().tobytes()).hexdigest()
print(json.dumps(out))
"""

TRAIN = r"""
import json, sys, time, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=460, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
model = Qwen2ForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=5e-3, fused=True)
ids = torch.randint(1, 460, (32, 90))
t = time.perf_counter()
for _ in range(60):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad()
print(json.dumps({"s": time.perf_counter() - t}))
"""


def child(code: str, env: dict[str, str], emulate: str | None = None) -> dict:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")
    }
    cmd = [sys.executable, "-c", code]
    if emulate:
        cmd = ["qemu-x86_64", "-cpu", emulate, *cmd]
    done = subprocess.run(
        cmd, env={**base, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emulate", default="EPYC-Rome", help="qemu CPU model to compare with")
    ap.add_argument("--no-emulate", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds per setting (best is kept)")
    args = ap.parse_args()
    emulate = None if args.no_emulate or not shutil.which("qemu-x86_64") else args.emulate
    if emulate:
        print(f"ops whose bytes differ between this CPU and qemu -cpu {emulate}:")
        for name, env in SETTINGS.items():
            here, there = child(OPS, env), child(OPS, env, emulate)
            differ = [k for k in here if here[k] != there[k]]
            print(f"  {name}: {len(differ)} of {len(here)}: {', '.join(differ) or 'none'}")
    print("60 pretraining steps of the tiny model (batch 32 x 90 tokens), best of", args.rounds)
    times = {}
    for name, env in SETTINGS.items():
        times[name] = min(child(TRAIN, env)["s"] for _ in range(args.rounds))
    for name, s in times.items():
        print(f"  {name}: {s:.2f} s ({s / times['unpinned']:.2f}x unpinned)")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)")
