"""Extraction throughput: lorascope's store writer side by side with a plain forward and the paper's approach.

All three run in one process on the same randomly initialised Qwen2 (Qwen2.5-0.5B widths on CUDA in
bf16; on CPU a cut-down fp32 config) with the same random rank-1 LoRA on all seven projections, over
the same random documents:

  (a) plain forward: the merged model's decoder stack (no LM head, no hooks) on the batches the
      extractor packs; the full CausalLM forward (with LM head) is printed for context only;
  (b) lorascope: ``Extractor.run`` + ``write_shard`` (float16) for every planned shard;
  (c) reference (the paper's code): the unmerged peft model, forward hooks on every ``lora_A`` that
      copy its output to the CPU, one document per forward (with LM head), one gzip HDF5 file per
      document with a dataset per component and the per-token strings from ``tokenizer.decode``.

Goals: (b)/(a) >= 0.95 and (b)/(c) >= 2. Each approach gets one warm-up pass, then ``--repeats``
rounds run the approaches in turn (a busy machine slows them alike); the figure is each one's median
tokens/s, the best round beside it. A check line compares (b)'s values with (c)'s on the first document.

Usage: python benchmarks/extract.py [--layers 24] [--vocab 151936] [--hidden 896] [--docs 64]
       [--min-len 1000] [--max-len 4000] [--shard-tokens 65536] [--batch-tokens 32768] [--repeats 3]
       [--tokenizer ../shared/data/qwen2.5-tokenizer]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], None]], tokens: int, repeats: int, device: str
) -> dict[str, list[float]]:
    """Tokens/s of each function per round: one warm-up call each, then ``repeats`` rounds that call them
    in turn (so a busy machine slows every approach alike)."""
    for fn in fns.values():
        fn()
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            rates[name].append(tokens / (time.perf_counter() - t0))
    return rates


def write_models(
    args: argparse.Namespace, base_dir: Path, adapter_dir: Path, device: str, dtype: torch.dtype
) -> None:
    """Save a random Qwen2 and a random rank-1 LoRA on it where the project's loader reads them."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lorascope.models import model_name

    cfg = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(32768, args.max_len), tie_word_embeddings=True, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.save_pretrained(base_dir)
    lora = LoraConfig(r=1, lora_alpha=16, use_rslora=True, target_modules=TARGETS)
    peft_model = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    # the extractor checks that the adapter names this base (relative to the workspace root)
    peft_model.peft_config["default"].base_model_name_or_path = model_name(base_dir)
    # peft would resolve that relative name against the cwd and might save the embeddings too
    peft_model.save_pretrained(adapter_dir, save_embedding_layers=False)


def make_docs(args: argparse.Namespace, id_limit: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(args.seed + 2)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.docs,), generator=g).tolist()
    return [torch.randint(0, id_limit, (n,), generator=g).tolist() for n in lengths]


def padded_batches(docs: list[list[int]], batch_tokens: int, device: str) -> list[tuple[Any, Any]]:
    """``(input_ids, attention_mask or None)`` on ``device`` per batch, exactly as ``Extractor.run`` builds them."""
    from lorascope.extract.batching import padded_batches as batches

    return [
        (ids.to(device), None if mask is None else mask.to(device))
        for _, ids, mask in batches(docs, batch_tokens)
    ]


class Reference:
    """The paper's extraction: unmerged peft model, ``lora_A`` output hooks, gzip HDF5 per document."""

    def __init__(self, base_dir: Path, adapter_dir: Path, dtype: torch.dtype, device: str, tokenizer: Any):
        from peft import PeftModel

        from lorascope.models import load_model

        base = load_model(base_dir, dtype=dtype).to(device).eval()
        self.model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        self.tokenizer, self.device = tokenizer, device
        self.recorded: dict[str, Any] = {}
        layer = re.compile(r"layers\.(\d+)\.\w+\.(\w+)$")
        for name, module in self.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                m = layer.search(name)
                key = f"L{m.group(1)}.{m.group(2)}"
                module.lora_A["default"].register_forward_hook(self._hook(key))

    def _hook(self, key: str) -> Callable[..., None]:
        def copy(_m: Any, _args: Any, out: Any) -> None:
            self.recorded[key] = out.detach().cpu()

        return copy

    def run(self, docs: list[list[int]], out_dir: Path) -> None:
        import h5py

        for i, doc in enumerate(docs):
            with torch.no_grad():
                self.model(input_ids=torch.tensor([doc], device=self.device), use_cache=False)
            strings = [self.tokenizer.decode([tok]) for tok in doc]
            with h5py.File(out_dir / f"doc-{i:05d}.h5", "w") as f:
                for key, value in self.recorded.items():
                    f.create_dataset(key, data=value[0].float().numpy(), compression="gzip")
                f.create_dataset("token_ids", data=doc, compression="gzip")
                f.create_dataset("tokens", data=strings, dtype=h5py.string_dtype(), compression="gzip")


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24 if cuda else 4)
    p.add_argument("--vocab", type=int, default=151936 if cuda else 32768)
    p.add_argument("--hidden", type=int, default=896 if cuda else 256)
    p.add_argument("--intermediate", type=int, default=4864 if cuda else 1024)
    p.add_argument("--heads", type=int, default=14 if cuda else 4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--docs", type=int, default=64 if cuda else 48)
    p.add_argument("--min-len", type=int, default=1000 if cuda else 100)
    p.add_argument("--max-len", type=int, default=4000 if cuda else 400)
    p.add_argument("--shard-tokens", type=int, default=65536 if cuda else 2048)
    p.add_argument("--batch-tokens", type=int, default=32768, help="extract.batch_tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=Path, default=ROOT.parent / "shared" / "data" / "qwen2.5-tokenizer")
    args = p.parse_args()
    device = "cuda" if cuda else "cpu"

    tmp = Path(tempfile.mkdtemp(prefix="lorascope-bench-extract-")).resolve()
    os.environ["LORASCOPE_ROOT"] = str(tmp)  # model_name() is relative to the workspace root
    try:
        run(args, device, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, device: str, tmp: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from lorascope.devices import resolve
    from lorascope.extract.extractor import Extractor
    from lorascope.extract.store import plan_shards, write_shard

    _, dtype = resolve("auto", "auto", "extract")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    base_dir, adapter_dir = tmp / "models" / "base", tmp / "models" / "lora"
    write_models(args, base_dir, adapter_dir, device, dtype)
    docs = make_docs(args, min(args.vocab, len(tokenizer)))
    tokens = sum(len(d) for d in docs)
    plan = plan_shards([len(d) for d in docs], args.shard_tokens)

    extractor = Extractor.load("lora", "merged", base_dir, adapter_dir, "auto", device, 60)
    decoder = extractor.decoder()
    shard_batches = [padded_batches(docs[s.first_doc : s.last_doc], args.batch_tokens, device) for s in plan]

    def forward(full: bool) -> Callable[[], None]:
        module = extractor.model if full else decoder

        def go() -> None:
            with torch.inference_mode():
                for batches in shard_batches:
                    for ids, mask in batches:
                        module(input_ids=ids, attention_mask=mask, use_cache=False)

        return go

    shard_dir = tmp / "store"
    shard_dir.mkdir()

    def lorascope_pass() -> None:
        for s in plan:
            acts_TC, ids_T = extractor.run(docs[s.first_doc : s.last_doc], args.batch_tokens, "float16")
            write_shard(shard_dir / s.file, acts_TC, ids_T)

    reference = Reference(base_dir, adapter_dir, dtype, device, tokenizer)
    h5_dir = tmp / "h5"
    h5_dir.mkdir()
    approaches = {
        "(a) plain forward, decoder": forward(False),
        "    full CausalLM forward": forward(True),
        "(b) lorascope extract + shards": lorascope_pass,
        "(c) reference, peft + gzip HDF5": lambda: reference.run(docs, h5_dir),
    }
    runs = interleaved(approaches, tokens, args.repeats, device)
    rates = {name: statistics.median(r) for name, r in runs.items()}

    # sanity: (b)'s first document against (c)'s
    import h5py

    stored = load_file(str(shard_dir / plan[0].file))["acts_TC"][: len(docs[0])].float()
    with h5py.File(h5_dir / "doc-00000.h5") as f:
        ref = torch.stack([torch.from_numpy(f[n][:, 0]) for n in extractor.names], 1)
    rel = ((stored - ref).abs().max() / ref.abs().max()).item()

    where = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})"
    )
    print(f"{where}, torch {torch.get_num_threads()} threads, compute {dtype}, store float16")
    print(
        f"model: layers {args.layers}, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"heads {args.heads}/{args.kv_heads} kv, vocab {args.vocab}; rank-1 LoRA x {len(extractor.names)} "
        "components"
    )
    print(
        f"documents: {len(docs)} of {args.min_len}-{args.max_len} tokens ({tokens} tokens), "
        f"{len(plan)} shards of <= {args.shard_tokens}, batch_tokens {args.batch_tokens}, "
        f"median of {args.repeats}"
    )
    print(f"{'approach':<34} {'tokens/s':>12} {'best':>12}")
    for name, r in rates.items():
        print(f"{name:<34} {r:12.0f} {max(runs[name]):12.0f}")
    a, b, c = (rates[k] for k in rates if k.startswith(("(a)", "(b)", "(c)")))
    print(f"(b)/(a) {b / a:6.2f}x   (goal >= 0.95: {'met' if b / a >= 0.95 else 'MISSED'})")
    print(f"(b)/(c) {b / c:6.2f}x   (goal >= 2: {'met' if b / c >= 2 else 'MISSED'})")
    print(f"check: max |b - c| / max |c| on document 0 = {rel:.2e}")


if __name__ == "__main__":
    main()
