"""Streaming contexts selection: activations/s and peak RAM of one pass, beside a brute-force top-k.

Writes a synthetic activation store in the project's format (fp16 random normal activations, random
token ids, documents of random length; 10M tokens x 448 components = about 9 GB by default), then
times one ``Selector`` pass over it with the ``contexts`` defaults (top 64 per feature sign, windows
32 + 1 + 8, 10 x 5 quantile samples, 10 random). The pass runs in a fresh process so that its peak
RSS (VmHWM) holds the pass alone, not the store generation; one shard in RAM is printed beside it.

The peer is the brute force: the whole store loaded into RAM as float32 and ``torch.topk`` over all
tokens for both signs (the top-k only: no windows, samples or statistics). It runs only when
tokens x components x 4 bytes fits in 40% of RAM; use e.g. ``--tokens 1000000`` for it. When it runs,
its top-k values are checked against the streaming pass's.

Generation is not timed. The store is written shard by shard (one shard of RAM); the store was just
written, so the pass may read it from the page cache.

Usage: python benchmarks/contexts.py [--tokens 10000000] [--components 448] [--shard-tokens 1000000]
       [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 151665
ROWS = 65536  # rows of random numbers generated at a time


def peak_rss_bytes() -> int:
    """Peak RSS of this process. ``ru_maxrss`` of a child starts at its parent's peak (Linux keeps it
    across fork and exec), so read the address space's own high-water mark where there is one."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def document_lengths(tokens: int, lo: int, hi: int, g: torch.Generator) -> list[int]:
    """Random lengths in [lo, hi] summing to ``tokens`` (the last one cut to fit)."""
    lengths, left = [], tokens
    while left > 0:
        n = min(left, int(torch.randint(lo, hi + 1, (), generator=g)))
        lengths.append(n)
        left -= n
    return lengths


def generate(root: Path, args: argparse.Namespace) -> None:
    """Write shards and ``index.json`` as the extract stage would (one shard in RAM at a time)."""
    from lorascope.extract.store import plan_shards, write_index, write_shard

    g = torch.Generator().manual_seed(args.seed)
    lengths = document_lengths(args.tokens, args.min_doc, args.max_doc, g)
    plan = plan_shards(lengths, args.shard_tokens)
    C = args.components
    for shard in plan:
        acts_TC = torch.empty(shard.tokens, C, dtype=torch.float16)
        for r0 in range(0, shard.tokens, ROWS):
            r1 = min(shard.tokens, r0 + ROWS)
            acts_TC[r0:r1] = torch.randn(r1 - r0, C, generator=g)
        ids_T = torch.randint(0, VOCAB, (shard.tokens,), generator=g, dtype=torch.int32)
        write_shard(root / shard.file, acts_TC, ids_T)
        del acts_TC, ids_T
    comps = [(layer, kind) for layer in range(-(-C // len(KINDS))) for kind in KINDS][:C]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    write_index(
        root,
        {
            "source": "lora",
            "model": "benchmark/random",
            "adapter": "models/lora",
            "method": "merged",
            "precision": "bfloat16",
            "components": [f"L{layer}.{kind}" for layer, kind in comps],
            "modules": [
                {"layer": layer, "kind": kind, "module": f"model.layers.{layer}.{kind}", "width": 1}
                for layer, kind in comps
            ],
            "dtype": "float16",
            "tokens": args.tokens,
            "documents": [[f"doc-{i}", s, n] for i, (s, n) in enumerate(zip(starts, lengths, strict=False))],
            "shards": [s.to_json() for s in plan],
            "run_id": "benchmark",
        },
    )


def streaming_pass(root: Path, save_top: Path | None) -> dict:
    """One ``Selector`` pass over the store, as the contexts stage runs it (no checkpoints, no tables)."""
    from lorascope.contexts.params import ContextsSection
    from lorascope.contexts.selection import Selector, ShardView
    from lorascope.contexts.stage import token_keys
    from lorascope.extract.store import Store

    rss_before = peak_rss_bytes()
    t0 = time.perf_counter()
    store = Store.open(root)
    cfg = ContextsSection()
    selector = Selector(len(store.components), (1, -1), cfg)
    for shard in store.shards:
        acts_TC, ids_T = store.read(shard)
        lengths = [d[2] for d in store.documents[shard.first_doc : shard.last_doc]]
        view = ShardView.build(shard.start, acts_TC, ids_T, lengths)
        selector.update(view, None, token_keys(cfg.seed, shard))
        del acts_TC, ids_T, view
    seconds = time.perf_counter() - t0
    if save_top is not None:
        torch.save(selector.state["top.score"], save_top)
    return {"seconds": seconds, "peak_rss": peak_rss_bytes(), "rss_before": rss_before}


def brute_force(root: Path, k: int, save_top: Path | None) -> dict:
    """The whole store as one float32 matrix in RAM, then ``topk`` over all tokens per feature sign."""
    from lorascope.extract.store import Store

    rss_before = peak_rss_bytes()
    t0 = time.perf_counter()
    store = Store.open(root)
    all_TC = torch.empty(store.tokens, len(store.components))
    for shard in store.shards:
        acts_TC, _ = store.read(shard)
        all_TC[shard.start : shard.start + shard.tokens] = acts_TC
        del acts_TC
    t1 = time.perf_counter()
    top = all_TC.topk(k, dim=0).values.T  # [C, k]
    bottom = all_TC.topk(k, dim=0, largest=False).values.T
    seconds = time.perf_counter() - t0
    if save_top is not None:
        torch.save(torch.stack([top, -bottom]), save_top)  # the selector's [sign, C, k] scores
    return {"seconds": seconds, "topk_seconds": seconds - (t1 - t0), "peak_rss": peak_rss_bytes(),
            "rss_before": rss_before}  # fmt: skip


def child(flag: str, root: Path, save_top: Path) -> dict:
    """Run this script with ``flag`` in a fresh process; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, flag, str(root), "--save-top", str(save_top)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=10_000_000)
    p.add_argument("--components", type=int, default=448)
    p.add_argument("--shard-tokens", type=int, default=1_000_000)
    p.add_argument("--min-doc", type=int, default=2000)
    p.add_argument("--max-doc", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, help="store directory (kept); reused when it holds a matching store")
    p.add_argument("--keep", action="store_true", help="keep the default temporary store")
    p.add_argument("--pass-only", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--brute-only", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--save-top", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.pass_only:
        print(json.dumps(streaming_pass(args.pass_only, args.save_top)))
        return
    if args.brute_only:
        from lorascope.contexts.params import ContextsSection

        print(json.dumps(brute_force(args.brute_only, ContextsSection().top_k, args.save_top)))
        return

    temp = args.dir is None
    root = Path(tempfile.mkdtemp(prefix="lorascope-bench-contexts-")) if temp else args.dir
    scratch = Path(tempfile.mkdtemp(prefix="lorascope-bench-scores-"))
    try:
        run(args, root, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if temp and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif temp:
            print(f"store kept in {root}")


def run(args: argparse.Namespace, root: Path, scratch: Path) -> None:
    index = root / "index.json"
    reuse = False
    if index.is_file():
        meta = json.loads(index.read_text())
        reuse = meta.get("tokens") == args.tokens and len(meta.get("components", [])) == args.components
    if not reuse:
        if root.exists() and any(root.iterdir()):
            sys.exit(f"{root}: not empty and not a matching store; pick an empty --dir")
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        generate(root, args)
        print(f"generated the store in {time.perf_counter() - t0:.0f} s (not timed)", flush=True)

    from lorascope.contexts.params import ContextsSection
    from lorascope.extract.store import Store

    store = Store.open(root)
    T, C = store.tokens, len(store.components)
    disk = sum((root / s.file).stat().st_size for s in store.shards)
    largest = max(s.tokens for s in store.shards)
    stream = child("--pass-only", root, scratch / "pass.pt")

    ram, need = ram_bytes(), T * C * 4
    brute = None
    if need <= 0.4 * ram:
        brute = child("--brute-only", root, scratch / "brute.pt")
    print(f"CPU ({os.cpu_count()} cores, {gb(ram)} RAM), torch {torch.get_num_threads()} threads")
    print(
        f"store: {T} tokens x {C} components float16, {len(store.documents)} documents, "
        f"{len(store.shards)} shards of <= {args.shard_tokens} tokens, {gb(disk)} on disk"
    )
    c = ContextsSection()
    print(
        f"contexts defaults: top {c.top_k} per sign, windows {c.window_before}+1+{c.window_after}, "
        f"{c.quantile_bins} x {c.quantile_samples} quantile samples, {c.random_samples} random"
    )
    print(
        f"streaming pass: {stream['seconds']:8.1f} s  {T * C / stream['seconds']:12.3e} activations/s  "
        f"{T / stream['seconds']:10.0f} tokens/s  peak RSS {gb(stream['peak_rss'])} "
        f"(after imports {gb(stream['rss_before'])})"
    )
    print(f"one shard in RAM: {largest} x {C} x 2 bytes = {gb(largest * C * 2)}")
    if brute is None:
        print(f"brute force: skipped; the store as float32 needs {gb(need)} > 40% of RAM ({gb(0.4 * ram)})")
        return
    print(
        f"brute force:    {brute['seconds']:8.1f} s  {T * C / brute['seconds']:12.3e} activations/s  "
        f"{T / brute['seconds']:10.0f} tokens/s  peak RSS {gb(brute['peak_rss'])} "
        f"(topk alone {brute['topk_seconds']:.1f} s)"
    )
    print(
        f"streaming / brute force: {brute['seconds'] / stream['seconds']:.2f}x speed, "
        f"{stream['peak_rss'] / brute['peak_rss']:.2f}x peak RAM"
    )
    same = torch.equal(torch.load(scratch / "pass.pt"), torch.load(scratch / "brute.pt"))
    print(f"check: streaming top-k values equal the brute force's: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
