"""LLM client throughput: concurrent requests against a fixed-latency server, and cached re-runs.

Starts the tests' local OpenAI-compatible server (tests/llm_server.py) with a fixed latency per
request, sends ``--prompts`` distinct prompts through the real openai SDK (``make_client`` +
``run_all``) at concurrency 1 and at ``--concurrency`` c, and prints the wall times and the speed-up
(goal >= 0.7 c). Then fills a disk cache with ``--cached`` distinct prompts through the server and
re-runs them: goal 0 requests and under 1 s.

Usage: python benchmarks/autointerp.py [--prompts 64] [--concurrency 16] [--latency-ms 200] [--cached 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from llm_server import LlmServer  # noqa: E402
from lorascope.llm.cache import DiskCache  # noqa: E402
from lorascope.llm.clients import CachedClient, Client, make_client, run_all  # noqa: E402


async def timed_run(client: Client, prompts: list[str], concurrency: int, label: str) -> float:
    """Wall seconds to answer ``prompts``; exits if any failed (a benchmark of errors is meaningless)."""

    async def one(prompt: str):
        return await client.complete(prompt, max_tokens=64, temperature=0.0)

    t0 = time.perf_counter()
    results = await run_all(prompts, one, concurrency, label)
    seconds = time.perf_counter() - t0
    failures = [r for r in results if isinstance(r, Exception)]
    if failures:
        raise SystemExit(f"{len(failures)} of {len(prompts)} requests failed, e.g.: {failures[0]}")
    return seconds


async def bench(args: argparse.Namespace, srv: LlmServer, cache_dir: Path) -> None:
    client = make_client("openai-compatible", "bench-model", base_url=f"{srv.url}/v1", max_retries=0)
    prompts = [f"label feature {i}" for i in range(args.prompts)]
    c = args.concurrency
    print(f"{args.prompts} prompts, {args.latency_ms} ms server latency, openai SDK via run_all")
    seconds = {}
    for n in (1, c):
        seconds[n] = await timed_run(client, prompts, n, f"concurrency {n}")
        print(f"concurrency {n:3d}: {seconds[n]:7.2f} s  {args.prompts / seconds[n]:7.1f} requests/s")
    print(f"speed-up {seconds[1] / seconds[c]:.1f}x (goal >= {0.7 * c:.1f}x = 0.7 x {c})")

    cached = [f"cached feature {i}" for i in range(args.cached)]
    filling = CachedClient(client, DiskCache(cache_dir))
    await timed_run(filling, cached, 64, "filling the cache")
    before = srv.count()
    rerun = CachedClient(client, DiskCache(cache_dir))
    seconds_cached = await timed_run(rerun, cached, c, "cached re-run")
    made = srv.count() - before
    print(
        f"cached re-run of {args.cached} prompts: {made} requests (goal 0; client counted {rerun.requests}),"
    )
    print(f"  {rerun.hits} cache hits, {seconds_cached:.2f} s (goal < 1 s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--latency-ms", type=int, default=200)
    p.add_argument("--cached", type=int, default=1000)
    args = p.parse_args()
    with LlmServer(latency_s=args.latency_ms / 1000) as srv, tempfile.TemporaryDirectory() as d:
        asyncio.run(bench(args, srv, Path(d)))


if __name__ == "__main__":
    main()
