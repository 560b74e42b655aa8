"""Feature dashboard at the budget size: file size (goal <= 25 MB) and open time (goal < 3 s).

Builds synthetic dashboard data of the paper's scale with ``lorascope.report.rendering.render`` (the
same packing as ``lorascope report``, without running the pipeline): 2000 features (896 LoRA direction
signs = 64 layers x 7 components x 2 signs, 384 MLP neurons, 720 SAE latents) x 64 top contexts of 41
tokens, token ids drawn Zipf-like (rank^-1.1, as text is) from a Qwen-sized vocabulary (151,665 random
token strings), 40-bin histograms, a 1024-token training sample per feature (each in its own document
by default: no sharing, the largest case) and a 64 x 7 decoder heatmap per SAE latent. LoRA and MLP
activations are dense (Gaussian), SAE activations sparse (about 5% nonzero in a window).

It prints the file size against the 25 MB goal, then opens the file in headless Chromium (the system
``/usr/bin/chromium`` with ``--no-sandbox --disable-gpu --disable-background-networking``, every
non-file request aborted) and times, from navigation start, (1) the feature list rendered, (2) the
embedded arrays decoded, (3) the first feature's detail shown after a click on it (goal < 3 s); the
median of ``--runs`` fresh pages. There is no peer: the goals are the comparison.

Usage: python benchmarks/dashboard.py [--features 2000] [--contexts 64] [--sample-docs N] [--runs 5]
       [--out FILE] [--compresslevel 9] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lorascope.report.packing import Bulk
from lorascope.report.rendering import render
from lorascope.sections import LORA_TARGETS

VOCAB = 151_665
LAYERS = 64
WINDOW = (32, 8)  # tokens before and after the selected one (the contexts defaults)
SIZE_GOAL_MB = 25.0
OPEN_GOAL_S = 3.0
ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?()[]{}+-*/=_'\"") + list(
    "éüßøλπΣ∫≤≥→中文字符日本語한국어"
)


def vocabulary(rng: np.random.Generator) -> list[str]:
    """Random token strings, 1-9 characters, a third with a leading space, some newlines."""
    lengths = rng.integers(1, 10, VOCAB)
    chars = rng.integers(0, len(ALPHABET), int(lengths.sum()))
    out, i = [], 0
    for n in lengths:
        out.append("".join(ALPHABET[c] for c in chars[i : i + n]))
        i += n
    for j in rng.choice(VOCAB, VOCAB // 3, replace=False):
        out[j] = " " + out[j]
    for j in rng.choice(VOCAB, 200, replace=False):
        out[j] = "\n" * int(rng.integers(1, 3))
    return out


def zipf_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` token ids with P(rank r) proportional to r^-1.1 over the vocabulary (ids shuffled)."""
    p = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
    cdf = np.cumsum(p / p.sum())
    perm = rng.permutation(VOCAB)
    return perm[np.minimum(np.searchsorted(cdf, rng.random(n)), VOCAB - 1)]


def synthetic(args: argparse.Namespace) -> tuple[dict, Bulk]:
    rng = np.random.default_rng(args.seed)
    n_lora = min(args.features, LAYERS * len(LORA_TARGETS) * 2)
    n_mlp = min(args.features - n_lora, LAYERS * 6)
    n_sae = args.features - n_lora - n_mlp
    kinds = list(LORA_TARGETS)
    width = WINDOW[0] + 1 + WINDOW[1]
    n_ctx = args.features * args.contexts
    words = ["reasoning", "backtracking", "arithmetic", "formatting", "numbers", "Wait", "answer", "newline",
             "punctuation", "variables", "equations", "units", "proof", "check", "LaTeX", "code"]  # fmt: skip
    categories = [
        "reasoning_word",
        "digits",
        "punctuation",
        "whitespace_or_newline",
        "special_marker",
        "other_word",
    ]
    features = []
    for i in range(args.features):
        if i < n_lora:
            source, fid, sign = "lora", i // 2, 1 if i % 2 == 0 else -1
            layer, comp = fid // len(kinds), kinds[fid % len(kinds)]
            name = f"L{layer}.{comp}{'+' if sign > 0 else '-'}"
        elif i < n_lora + n_mlp:
            source, fid, sign = "mlp", i - n_lora, 1
            layer, comp = fid // 6, "mlp"
            name = f"L{layer}.mlp.{fid % 6}"
        else:
            source, fid, sign = "sae", i - n_lora - n_mlp, 1
            layer, comp, name = None, None, f"sae.{i - n_lora - n_mlp}"
        picked = rng.choice(words, 3, replace=False)
        counts = np.sort(rng.integers(0, 5000, 40))
        features.append({
            "source": source, "id": fid, "name": name, "sign": sign, "layer": layer, "component": comp,
            "explanation": f"Fires on {picked[0]} and {picked[1]} tokens, mostly in {picked[2]} contexts",
            "class": int(rng.integers(0, 3)), "status": "ok", "error": None,
            "category": categories[int(rng.integers(0, len(categories)))],
            "subcategory": f"sub_{int(rng.integers(0, 4))}" if source == "sae" else None,
            "detection": float(rng.uniform(0.4, 1.0)), "detection_n": 20,
            "density": float(rng.uniform(0, 0.5)), "max": float(rng.uniform(1, 20)),
            "top": [f" {w}" for w in rng.choice(words, 5, replace=False)],
            "ctx": [i * args.contexts, args.contexts],
            "hist": {"lo": -5.0, "hi": 5.0, "counts": counts.tolist(), "zeros": 0, "tokens": 1_000_000},
            "sample": None, "heat": None,
        })  # fmt: skip
    # contexts: dense Gaussian windows (LoRA, MLP) or sparse ones (SAE), the peak at WINDOW[0]
    ctx_tokens = zipf_ids(rng, n_ctx * width)
    acts = rng.normal(0, 1, (n_ctx, width)).astype(np.float32)
    sparse = np.repeat(np.array([f["source"] == "sae" for f in features]), args.contexts)
    acts[sparse] = np.where(rng.random((int(sparse.sum()), width)) < 0.05, np.abs(acts[sparse]) * 2, 0)
    peak = np.abs(rng.normal(0, 1, n_ctx)).astype(np.float32) + 4
    signs = np.repeat(np.array([f["sign"] for f in features]), args.contexts)
    acts[:, WINDOW[0]] = peak * signs
    # samples: one document each (or --sample-docs shared ones), 1024 tokens
    n_docs = args.sample_docs or args.features
    doc_of = np.arange(args.features) % n_docs
    seg_tokens = zipf_ids(rng, n_docs * args.sample_tokens)
    sample_acts = rng.normal(0, 1, (args.features, args.sample_tokens)).astype(np.float32)
    for i, f in enumerate(features):
        if f["source"] == "sae":
            sample_acts[i] = np.where(rng.random(args.sample_tokens) < 0.02, np.abs(sample_acts[i]) * 2, 0)
        p = int(rng.integers(0, args.sample_tokens))
        sample_acts[i, p] = 6.0 * f["sign"]
        f["sample"] = {"seg": int(doc_of[i]), "off": 0, "len": args.sample_tokens, "peak": p, "doc": int(doc_of[i]),
                       "doc_id": f"{int(doc_of[i]):016x}", "pos": 0, "act": 6.0 * f["sign"]}  # fmt: skip
    heat = rng.normal(0, 0.1, (n_sae, LAYERS * len(kinds))).astype(np.float32)
    for j, f in enumerate(features[n_lora + n_mlp :]):
        f["heat"] = j
    meta = {
        "title": "lorascope feature dashboard (synthetic benchmark data)",
        "classes": {"0": "monosemantic", "1": "broad but consistent", "2": "polysemantic"},
        "sources": [
            {"name": s, "features": n} for s, n in (("lora", n_lora), ("mlp", n_mlp), ("sae", n_sae)) if n
        ],
        "missing": [],
        "heatmap": {"layers": list(range(LAYERS)), "kinds": kinds},
        "segments": [],
        "features": features,
    }
    bulk = Bulk(
        vocab=vocabulary(rng),
        ctx_tokens=ctx_tokens,
        ctx_acts=acts.reshape(-1),
        ctx_lengths=np.full(n_ctx, width),
        ctx_peak=np.full(n_ctx, WINDOW[0]),
        ctx_activation=acts[:, WINDOW[0]].copy(),
        ctx_doc=rng.integers(0, 60_000, n_ctx),
        ctx_position=rng.integers(0, 16_000, n_ctx),
        seg_tokens=seg_tokens,
        seg_lengths=np.full(n_docs, args.sample_tokens),
        sample_acts=sample_acts.reshape(-1),
        heat=heat,
    )
    return meta, bulk


def open_times(path: Path, runs: int, chromium: str) -> list[dict[str, float]]:
    """Per fresh page: ms from navigation start to list ready, data decoded, first detail shown."""
    from playwright.sync_api import sync_playwright

    url = path.resolve().as_uri()
    out, blocked = [], []

    def route(r):  # noqa: ANN001, ANN202
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            headless=True,
        )
        for _ in range(runs):
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.route("**/*", route)
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m, errors=errors: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
            page.goto(url, wait_until="commit", timeout=60_000)
            page.wait_for_selector("body[data-list=ready] .feature-row", timeout=60_000)
            page.click(".feature-row >> nth=0")
            page.wait_for_selector("#detail[data-feature]", timeout=60_000)
            page.wait_for_selector("body[data-bulk=ready]", timeout=60_000)
            t = page.evaluate(
                "() => ({list: +document.body.dataset.listAt, bulk: +document.body.dataset.bulkAt,"
                " detail: +document.getElementById('detail').dataset.renderedAt,"
                " tokens: document.querySelectorAll('#detail .tok').length})"
            )
            if errors:
                raise SystemExit(f"page errors: {errors}")
            out.append(t)
            context.close()
        browser.close()
    if blocked:
        raise SystemExit(f"the page made requests: {blocked}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=2000)
    p.add_argument("--contexts", type=int, default=64, help="top contexts per feature")
    p.add_argument("--sample-tokens", type=int, default=1024)
    p.add_argument(
        "--sample-docs", type=int, default=0, help="distinct sample documents (0: one per feature)"
    )
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--compresslevel", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="where to write the dashboard (default: a temporary file)")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()

    t0 = time.perf_counter()
    meta, bulk = synthetic(args)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "dashboard.html"
        size = render(meta, bulk, out, compresslevel=args.compresslevel)
        t2 = time.perf_counter()
        n_tokens = len(bulk.ctx_tokens) + len(bulk.seg_tokens)
        print(f"{args.features} features x {args.contexts} contexts of {bulk.ctx_lengths[0]} tokens "
              f"({len(bulk.ctx_tokens):,} context tokens, {len(bulk.seg_tokens):,} sample tokens, "
              f"vocabulary {len(bulk.vocab):,})")  # fmt: skip
        print(f"generate {t1 - t0:.1f} s, render {t2 - t1:.1f} s (gzip level {args.compresslevel})")
        mb = size / 1e6
        verdict = "meets" if mb <= SIZE_GOAL_MB else "MISSES"
        print(f"file size {mb:.2f} MB ({size / n_tokens:.2f} bytes per embedded token) "
              f"{verdict} the {SIZE_GOAL_MB:.0f} MB goal")  # fmt: skip
        times = open_times(out, args.runs, args.chromium)
    med = {k: statistics.median(t[k] for t in times) / 1000 for k in ("list", "bulk", "detail")}
    print(f"open, median of {args.runs} fresh pages (from navigation start):")
    print(f"  feature list rendered   {med['list']:6.3f} s")
    print(f"  embedded data decoded   {med['bulk']:6.3f} s")
    print(f"  first detail shown      {med['detail']:6.3f} s  ({times[0]['tokens']} token spans)")
    verdict = "meets" if med["detail"] < OPEN_GOAL_S else "MISSES"
    print(f"open time {med['detail']:.3f} s {verdict} the {OPEN_GOAL_S:.0f} s goal")


if __name__ == "__main__":
    main()
