"""The feature dashboard: built from real pipeline outputs (tiny model: extract, SAE, contexts, heuristic
autointerp, categorize, run once for the module), checked against those outputs in Python (the
embedded arrays decoded as the page decodes them), then opened from disk in headless Chromium with
every non-file request blocked: search, detail, highlighted tokens, training sample, SAE heatmap,
filters, no request, no console or page error, no HTML injection; a missing source is listed."""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorascope.extract.store import Store
from lorascope.report.dashboard import build
from lorascope.report.packing import Bulk, rows_of
from lorascope.report.params import ReportSection
from lorascope.report.rendering import render

from tests.conftest import Prepared, make_workspace, tiny_params

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (CI installs it)"
)
SOURCES = ("lora", "mlp", "sae")
CFG = ReportSection(contexts_per_feature=6, histogram_bins=12, histogram_tokens=5000, sample_tokens=64)
"""6 of the 8 stored top contexts; 5000 tokens cross the first shard (4096); 64-token samples are cut
from longer documents (centring)."""
INJECTION = "<img src=x onerror=alert(1)></script><script>alert(2)</script>"
WORKSPACE_PARTS = ("models/base", "models/sae", "data/activations", "data/contexts", "data/interp")
KILLED = 3
"""Live latents that ``pipeline`` declares dead (drops from alive.json) after training: they do fire, so
only the alive.json filter keeps them out of contexts, labels, categories and the dashboard."""


# --------------------------------------------------------------------------------------- workspace
@pytest.fixture(scope="module")
def pipeline(prepared: Prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace where the real stages ran once (in-process): a random adapter, the LoRA and MLP
    stores, a short SAE run, contexts and heuristic labels of every source, categories."""
    from lorascope.autointerp.stage import run as autointerp
    from lorascope.categorize.stage import run as categorize
    from lorascope.contexts.stage import run as contexts
    from lorascope.extract.stage import run as extract
    from lorascope.sae.stage import run as sae

    from tests.extract.test_extract import make_adapter

    root = make_workspace(tmp_path_factory.mktemp("dashboard"))
    for d in ("models/base", "data/prepared"):
        shutil.copytree(prepared.root / d, root / d)
    params = tiny_params(sae={"epochs": 1.0, "kl_sequences": 0, "calibration_tokens": 4000})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASCOPE_ROOT", str(root))
        make_adapter(root)
        for source in ("lora", "mlp"):
            extract(params, source)
        sae(params)
        alive_path = root / "models/sae/alive.json"
        alive = json.loads(alive_path.read_text())
        alive["alive_latents"] = alive["alive_latents"][KILLED:]
        alive_path.write_text(json.dumps(alive))
        for source in SOURCES:
            contexts(params, source)
            autointerp(params, source)
        categorize(params)
    write_attribution(root, alive["alive_latents"])
    return root


def write_attribution(root: Path, alive: list[int]) -> None:
    """``attribute``'s three files for this workspace's units (every component, the live latents), in its
    format: the first three units measured exactly, the first one generated."""
    comps = sorted(
        {r["feature_name"].rstrip("+-") for r in pq.read_table(root / "data/interp/lora.parquet").to_pylist()}
    )
    units = [*comps, *(f"sae.{j}" for j in alive)]
    screen = [{"unit": u, "kind": "latent" if u.startswith("sae.") else "component", "rank": i + 1,
               "screened_delta_ce": 1.0 / (i + 1), "label": None} for i, u in enumerate(units)]  # fmt: skip
    exact = [{"unit": u, "delta_ce": 0.5 / (i + 1), "kl": 0.25 / (i + 1)} for i, u in enumerate(units[:3])]
    acc = {units[0]: {"delta_accuracy": -0.5, "delta_accuracy_ci": [-0.6, -0.4]}}
    out = root / "metrics/attribute"
    out.mkdir(parents=True, exist_ok=True)
    (out / "screen.json").write_text(json.dumps({"units": screen}))
    (out / "exact.json").write_text(json.dumps({"units": exact}))
    (out / "accuracy.json").write_text(json.dumps({"units": acc}))


@pytest.fixture(scope="module")
def dashboard(pipeline: Path) -> tuple[Path, Any]:
    info = build(pipeline, CFG, pipeline / "reports" / "dashboard.html")
    return pipeline, info


def derived_workspace(src: Path, dest: Path) -> Path:
    """A workspace of symlinks to ``src``'s inputs, except ``data/interp`` (copied, to be edited)."""
    make_workspace(dest)
    for part in WORKSPACE_PARTS:
        (dest / part).parent.mkdir(parents=True, exist_ok=True)
        if part == "data/interp":
            shutil.copytree(src / part, dest / part)
        else:
            (dest / part).symlink_to(src / part, target_is_directory=True)
    return dest


# ---------------------------------------------------------------------------- reading the file back
def decode(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a dashboard, decoded as its page does."""
    html = path.read_text(encoding="utf-8")
    meta = json.loads(re.search(r'<script type="application/json" id="meta">(.*?)</script>', html, re.S)[1])
    blob = re.search(r'<script type="application/octet-stream" id="bulk">(.*?)</script>', html, re.S)[1]
    raw = gzip.decompress(base64.b64decode(blob))
    types = {"u8": "<u1", "i8": "<i1", "u16": "<u2", "i16": "<i2", "u32": "<u4", "i32": "<i4", "f32": "<f4"}
    arrays = {
        name: np.frombuffer(raw, types[t], count, offset)
        for name, (offset, count, t) in meta["bulk"]["sections"].items()
    }
    meta["features"] = rows_of(meta["features"])
    return meta, arrays


def leb128(data: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 numbers, decoded one by one (the reference for the vectorised encoder)."""
    out, v, shift = [], 0, 0
    for b in data.tolist():
        v |= (b & 127) << shift
        shift += 7
        if not b & 128:
            out.append(v)
            v, shift = 0, 0
    assert shift == 0, "truncated LEB128"
    return np.array(out, np.int64)


class Reader:
    """Token strings and dequantised activations of a decoded dashboard."""

    def __init__(self, meta: dict[str, Any], a: dict[str, np.ndarray]) -> None:
        self.meta, self.a = meta, a
        text = a["vocab_utf8"].tobytes().decode("utf-8").encode("utf-16-le")
        off = np.concatenate([[0], np.cumsum(a["vocab_len"].astype(np.int64))])
        self.vocab = [text[2 * off[i] : 2 * off[i + 1]].decode("utf-16-le") for i in range(len(off) - 1)]
        self.ctx_tok, self.seg_tok = leb128(a["ctx_ids"]), leb128(a["seg_ids"])
        assert (
            len(self.ctx_tok) == meta["bulk"]["tokens"]
            and len(self.seg_tok) == meta["bulk"]["segment_tokens"]
        )
        self.ctx_start = np.concatenate([[0], np.cumsum(a["ctx_len"].astype(np.int64))])
        self.seg_start = np.concatenate([[0], np.cumsum(a["seg_len"].astype(np.int64))])

    def context(self, f: dict[str, Any], j: int) -> tuple[list[str], np.ndarray, int, float]:
        c = f["ctx"][0] + j
        s, n = int(self.ctx_start[c]), int(self.a["ctx_len"][c])
        ids = self.ctx_tok[s : s + n]
        acts = self.a["ctx_q"][s : s + n].astype(np.float64) * f["cs"] / 127
        return [self.vocab[i] for i in ids], acts, int(self.a["ctx_peak"][c]), float(self.a["ctx_act"][c])

    def sample(self, f: dict[str, Any]) -> tuple[list[str], np.ndarray]:
        s = f["sample"]
        start = int(self.seg_start[s["seg"]]) + s["off"]
        ids = self.seg_tok[start : start + s["len"]]
        acts = self.a["sample_q"][s["a"] : s["a"] + s["len"]].astype(np.float64) * f["ss"] / 127
        return [self.vocab[i] for i in ids], acts


def store_values(root: Path, source: str, columns: list[int], tokens: int) -> np.ndarray:
    """``[tokens, columns]`` activations of ``source`` from the start of its store (SAE: encoded)."""
    import torch

    from lorascope.sources import open_source

    src = open_source(source, root)
    x = torch.cat([acts for _, acts, _ in src.store]).float()[:tokens]
    with torch.no_grad():
        v = src.encode(x) if src.encode is not None else x
    return v[:, columns].numpy().astype(np.float64)


# ------------------------------------------------------------------------------- python-level tests
def test_build_embeds_the_pipeline_outputs(dashboard: tuple[Path, Any]):
    root, info = dashboard
    labels = {s: pq.read_table(root / f"data/interp/{s}.parquet").to_pylist() for s in SOURCES}
    assert info.sources == list(SOURCES) and info.missing == []
    assert info.features == {s: len(rows) for s, rows in labels.items()}
    assert info.path.stat().st_size == info.bytes
    meta, arrays = decode(info.path)
    r = Reader(meta, arrays)
    assert meta["format"] == "lorascope-dashboard/1" and len(meta["features"]) == sum(info.features.values())
    cats = {(c["source"], c["feature"], c["sign"]): c for c in pq.read_table(root / "data/interp/categories/assignments.parquet").to_pylist()}  # fmt: skip
    store_tokens = Store.open(root / "data/activations/lora").tokens
    scanned = min(CFG.histogram_tokens, store_tokens)
    by_source: dict[str, list[dict[str, Any]]] = {}
    for f in meta["features"]:
        by_source.setdefault(f["source"], []).append(f)
    for source in SOURCES:
        feats = by_source[source]
        rows = sorted(labels[source], key=lambda x: (x["feature"], -x["sign"]))
        assert [(f["id"], f["sign"], f["name"]) for f in feats] == [
            (x["feature"], x["sign"], x["feature_name"]) for x in rows
        ]
        ctx = pq.read_table(root / f"data/contexts/{source}.parquet").to_pandas()
        top = ctx[ctx.kind == "top"]
        values = store_values(root, source, sorted({f["id"] for f in feats}), scanned)
        col = {c: i for i, c in enumerate(sorted({f["id"] for f in feats}))}
        screen = {
            u["unit"]: u for u in json.loads((root / "metrics/attribute/screen.json").read_text())["units"]
        }
        exact = {
            u["unit"]: u for u in json.loads((root / "metrics/attribute/exact.json").read_text())["units"]
        }
        acc = json.loads((root / "metrics/attribute/accuracy.json").read_text())["units"]
        for f, lab in zip(feats, rows, strict=True):
            assert f["explanation"] == lab["explanation"] and f["class"] == lab["classification"]
            # a LoRA direction shows its component's effects, a latent its own, an MLP neuron none
            unit = f"sae.{f['id']}" if source == "sae" else lab["feature_name"].rstrip("+-")
            if source == "mlp":
                assert f["attr"] is None
            else:
                want = {
                    "rank": screen[unit]["rank"],
                    "screened": screen[unit]["screened_delta_ce"],
                    "units": len(screen),
                    **dict.fromkeys(("delta_ce", "kl", "delta_accuracy", "ci")),
                }
                if unit in exact:
                    want |= {"delta_ce": exact[unit]["delta_ce"], "kl": exact[unit]["kl"]}
                if unit in acc:
                    want |= {
                        "delta_accuracy": acc[unit]["delta_accuracy"],
                        "ci": acc[unit]["delta_accuracy_ci"],
                    }
                assert f["attr"] == want, (source, unit)
            cat = cats.get((source, f["id"], f["sign"]))
            assert f["category"] == (cat and cat["category"]) and f["subcategory"] == (
                cat and cat["subcategory"]
            )
            assert (f["layer"], f["component"]) == (lab["layer"], lab["component"])
            # contexts: the first `contexts_per_feature` top rows, tokens exact, activations to int8 precision
            mine = (
                top[(top.feature == f["id"]) & (top.sign == f["sign"])]
                .sort_values("rank")
                .head(CFG.contexts_per_feature)
            )
            assert f["ctx"][1] == len(mine) > 0
            for j, row in enumerate(mine.itertuples()):
                tokens, acts, peak, act = r.context(f, j)
                assert tokens == list(row.tokens) and peak == row.position - row.window_start
                assert act == pytest.approx(row.activation, rel=1e-6)
                np.testing.assert_allclose(acts, row.window_acts, atol=f["cs"] / 254 + 1e-7)
            # histogram: numpy over the first `histogram_tokens` tokens of the store
            v = values[:, col[f["id"]]]
            h = f["hist"]
            assert h["tokens"] == scanned and h["zeros"] == int((v == 0).sum())
            nz = v[v != 0].astype(np.float32)  # binned in float32, as the build does
            lo, width = np.float32(h["lo"]), np.float32(h["hi"] - h["lo"])
            expected = np.clip(
                np.floor((nz - lo) / width * np.float32(CFG.histogram_bins)), 0, CFG.histogram_bins - 1
            )
            counts = np.bincount(expected.astype(int), minlength=CFG.histogram_bins)
            if source == "sae":  # encoded in other blocks here: a value on a bin edge may move
                assert sum(h["counts"]) == len(nz) and np.abs(np.subtract(h["counts"], counts)).sum() <= 2
            else:
                assert h["counts"] == counts.tolist()
            # sample: the strongest activation in those tokens, at most `sample_tokens` around it
            s = f["sample"]
            signed = v * f["sign"]
            assert s is not None and s["len"] <= CFG.sample_tokens
            assert s["act"] * f["sign"] == pytest.approx(signed.max(), rel=1e-5)
            tokens, acts = r.sample(f)
            assert len(tokens) == s["len"] and (acts * f["sign"]).max() == acts[s["peak"]] * f["sign"]
            # re-encoded in other blocks (the SAE's float32 sums in another order): within 2% of the peak
            peak = acts.max() if f["sign"] > 0 else acts.min()
            np.testing.assert_allclose(peak, s["act"], rtol=0, atol=2e-2 * abs(s["act"]) + 1e-6)
    # SAE heatmaps: the decoder rows on the layer x kind grid
    from lorascope.sae.load import load_sae

    sae, cfg = load_sae(root / "models/sae")
    grid = meta["heatmap"]
    assert grid["layers"] == [0, 1] and grid["kinds"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    W = sae.W_dec_FD.detach().numpy()
    for f in by_source["sae"]:
        q = arrays["heat_q"][f["heat"] * 14 : (f["heat"] + 1) * 14].astype(np.float64) * f["hs"] / 127
        expected = [
            W[f["id"], cfg["components"].index(f"L{layer}.{kind}")]
            for layer in (0, 1)
            for kind in grid["kinds"]
        ]
        np.testing.assert_allclose(q, expected, atol=f["hs"] / 254 + 1e-7)


def test_missing_inputs_are_listed_and_the_rest_still_builds(pipeline: Path, tmp_path: Path):
    ws = derived_workspace(pipeline, tmp_path / "ws")
    (ws / "data/interp/sae.parquet").unlink()
    shutil.rmtree(ws / "data/interp/categories")
    info = build(ws, ReportSection(dashboard_sources=["lora", "sae"], max_features=3), tmp_path / "d.html")
    assert info.sources == ["lora"] and info.features == {"lora": 3}
    assert "sae: data/interp/sae.parquet not found" in info.missing
    assert any(
        m.startswith("categories: data/interp/categories/assignments.parquet not found") for m in info.missing
    )
    assert (
        "attribution: metrics/attribute/ not found (run `lorascope attribute`)" in info.missing
    )  # not derived
    meta, _ = decode(tmp_path / "d.html")
    lora = sorted(
        pq.read_table(ws / "data/interp/lora.parquet").to_pylist(), key=lambda x: (x["feature"], -x["sign"])
    )
    assert [f["name"] for f in meta["features"]] == [x["feature_name"] for x in lora[:3]]
    assert all(f["category"] is None for f in meta["features"])
    assert meta["missing"] == info.missing
    # nothing at all: still a valid (empty) dashboard
    empty = build(make_workspace(tmp_path / "empty"), ReportSection(), tmp_path / "e.html")
    assert empty.sources == [] and len(empty.missing) == 6 and (tmp_path / "e.html").is_file()


# ------------------------------------------------------------------------------------ in a browser
@pytest.fixture(scope="module")
def browser(pipeline: Path):  # noqa: ANN201 - after the pipeline: its asyncio runs before Playwright's loop
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (CI installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            headless=True,
        )
        yield b
        b.close()


class Page:
    """A dashboard opened from disk; every request, console error, page error and dialog recorded,
    and every request that is not for a file: URL aborted."""

    def __init__(self, browser: Any, path: Path, fragment: str = "") -> None:
        self.requests: list[str] = []
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)
        self.url = path.resolve().as_uri()
        self.page.goto(self.url + fragment)
        self.page.wait_for_selector("body[data-bulk=ready][data-list=ready]")

    def _route(self, route: Any) -> None:
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def rows(self) -> list[str]:
        return self.page.eval_on_selector_all(".feature-row", "rows => rows.map(r => r.dataset.key)")

    def count(self) -> int:
        return int(self.page.get_attribute("#count", "data-count"))

    def select(self, key: str) -> None:
        self.page.click(f'.feature-row[data-key="{key}"]')
        self.page.wait_for_function("k => document.getElementById('detail').dataset.feature === k", arg=key)

    def clean(self) -> None:
        assert self.requests == [self.url] and self.blocked == []
        assert self.errors == [] and self.dialogs == []


def number(title: str) -> tuple[float, float]:
    """The activation in a token's title and the rounding of its shown digits."""
    m = re.match(r"act (-?\d+(?:\.(\d+))?(?:e[-+]?\d+)?)", title)
    assert m, title
    shown = m[1]
    if "e" in shown:
        return float(shown), abs(float(shown)) * 1e-4
    return float(shown), 0.5 * 10 ** -len(m[2] or "")


@needs_chromium
def test_search_detail_and_filters_in_chromium(dashboard: tuple[Path, Any], browser: Any, tmp_path: Path):
    root, info = dashboard
    meta, _ = decode(info.path)
    feats = {f"{f['source']}/{f['name']}": f for f in meta["features"]}
    hay = {k: "\n".join([f["name"], f["explanation"] or "", *f["top"]]).lower() for k, f in feats.items()}
    p = Page(browser, info.path)
    assert p.count() == len(feats) and p.rows() == list(feats)[:200]

    # a word from a real SAE explanation that narrows the list
    words = [
        w for f in feats.values() if f["source"] == "sae" for w in re.findall(r"[A-Za-z]{3,}", f["explanation"] or "")
        if w.lower() not in ("heuristic", "fires") and 0 < sum(w.lower() in h for h in hay.values()) < len(feats)
    ]  # fmt: skip
    assert words, "no explanation word narrows the list"
    word = words[0]
    p.page.fill("#search", word)
    expected = [k for k in feats if word.lower() in hay[k]]
    assert p.rows() == expected and p.count() == len(expected) < len(feats)
    assert all(word.lower() in (feats[k]["explanation"] or "").lower() or any(word.lower() in t.lower() for t in feats[k]["top"]) or word.lower() in k.lower() for k in expected)  # fmt: skip

    # its detail: explanation, highlighted contexts with values, the sample, the heatmap
    key = next(k for k in expected if k.startswith("sae/"))
    f = feats[key]
    p.select(key)
    assert p.page.text_content("#d-explanation") == f["explanation"]
    assert p.page.locator(".ctx").count() == f["ctx"][1]
    highlighted = p.page.locator(".ctx .tok.hl")
    assert highlighted.count() > 0
    ctx = pq.read_table(root / "data/contexts/sae.parquet").to_pandas()
    first = ctx[(ctx.kind == "top") & (ctx.feature == f["id"])].sort_values("rank").iloc[0]
    spans = p.page.locator(".ctx >> nth=0").locator(".tok")
    titles = spans.evaluate_all("s => s.map(x => x.title)")
    texts = spans.evaluate_all("s => s.map(x => x.textContent)")
    assert len(titles) == len(first.window_acts)
    assert "".join(texts) == "".join(first.tokens).replace("\n", "\u21b5").replace("\t", "\u21e5").replace(
        "\r", ""
    )
    for title, true in zip(titles, first.window_acts, strict=True):
        shown, rounding = number(title)
        assert abs(shown - true) <= f["cs"] / 254 + rounding + 1e-6, (title, true)
    peak = p.page.locator(".ctx >> nth=0").locator(".tok.peak")
    assert number(peak.get_attribute("title"))[0] == pytest.approx(first.activation, rel=1e-4)
    assert p.page.locator("#sample .tok").count() == f["sample"]["len"]
    assert p.page.locator("#sample .tok.hl").count() > 0 and p.page.locator("#sample-peak").count() == 1
    grid = meta["heatmap"]
    assert p.page.locator("#heatmap td.cell").count() == len(grid["layers"]) * len(grid["kinds"]) == 14
    assert p.page.locator("#heatmap tbody tr").count() == len(grid["kinds"])
    assert p.page.locator(".hist svg rect").count() == CFG.histogram_bins
    a = f["attr"]  # the unit's effects beside its label (attribute's files, as the fixture wrote them)
    shown = p.page.locator("dl.facts dd").all_text_contents()
    want = f"screen rank {a['rank']} of {a['units']} (ΔCE {a['screened']:.3f} nats/token)"
    assert any(d.startswith(want) for d in shown), shown

    # filters: source, then class, against the label sets
    p.page.fill("#search", "")
    labels = pq.read_table(root / "data/interp/lora.parquet").to_pylist()
    p.page.select_option("#f-source", "lora")
    assert p.count() == len(labels) == len(p.rows())
    assert all(k.startswith("lora/") for k in p.rows())
    cls = max({0, 1, 2}, key=lambda c: sum(x["classification"] == c for x in labels))
    p.page.select_option("#f-class", str(cls))
    want = [
        f"lora/{x['feature_name']}"
        for x in sorted(labels, key=lambda x: (x["feature"], -x["sign"]))
        if x["classification"] == cls
    ]
    assert p.count() == len(want) and p.rows() == want
    p.page.select_option("#f-source", "sae")
    sae_labels = pq.read_table(root / "data/interp/sae.parquet").to_pylist()
    assert p.count() == sum(x["classification"] == cls for x in sae_labels)

    shot = tmp_path / "dashboard.png"
    p.page.select_option("#f-source", "")
    p.page.select_option("#f-class", "")
    p.select(key)
    p.page.screenshot(path=str(shot), full_page=False)
    if os.environ.get("LORASCOPE_TEST_ARTIFACTS"):
        dest = Path(os.environ["LORASCOPE_TEST_ARTIFACTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / "dashboard.png")
    assert shot.stat().st_size > 10_000
    p.clean()
    p.context.close()


@needs_chromium
def test_explanations_cannot_inject_html(pipeline: Path, browser: Any, tmp_path: Path):
    ws = derived_workspace(pipeline, tmp_path / "ws")
    path = ws / "data/interp/lora.parquet"
    table = pq.read_table(path)
    explanations = table["explanation"].to_pylist()
    explanations[0] = INJECTION
    key = "lora/" + table["feature_name"][0].as_py()
    table = table.set_column(
        table.schema.get_field_index("explanation"), "explanation", pa.array(explanations, pa.string())
    )
    pq.write_table(table, path)
    info = build(
        ws,
        ReportSection(dashboard_sources=["lora"], max_features=4, histogram_tokens=500),
        tmp_path / "d.html",
    )
    assert info.sources == ["lora"]
    p = Page(browser, info.path)
    p.page.fill("#search", "onerror")
    assert p.rows() == [key]
    assert p.page.text_content(".feature-row .fexpl") == INJECTION
    p.select(key)
    assert p.page.text_content("#d-explanation") == INJECTION
    assert p.page.locator("img").count() == 0 and p.page.locator("script").count() == 3
    p.page.wait_for_timeout(200)
    p.clean()
    p.context.close()


@needs_chromium
def test_long_lists_render_lazily(browser: Any, tmp_path: Path):
    """``render`` on its own (as the benchmark uses it): 450 features, 200 rows at a time; a link
    with a feature's key opens its detail."""
    n = 450
    features = [
        {"source": "mlp", "id": i, "name": f"L{i % 4}.mlp.{i}", "sign": 1, "layer": i % 4, "component": "mlp",
         "explanation": f"feature {i} " + ("even" if i % 2 == 0 else "odd"), "class": i % 3, "status": "ok",
         "category": None, "top": ["a"], "ctx": [i, 1], "hist": None, "sample": None, "heat": None}
        for i in range(n)
    ]  # fmt: skip
    bulk = Bulk(
        vocab=["a", " b", "\n", "é"], ctx_tokens=np.tile([0, 1, 2, 3], n), ctx_acts=np.tile([0.5, -1.0, 0.0, 0.25], n),
        ctx_lengths=np.full(n, 4), ctx_peak=np.full(n, 1), ctx_activation=np.full(n, -1.0), ctx_doc=np.zeros(n, int),
        ctx_position=np.arange(n), seg_tokens=np.zeros(0, int), seg_lengths=np.zeros(0, int),
        sample_acts=np.zeros(0), heat=np.zeros((0, 0)),
    )  # fmt: skip
    meta = {
        "title": "t",
        "classes": {"0": "a", "1": "b", "2": "c"},
        "sources": [{"name": "mlp", "features": n}],
        "features": features,
    }
    out = tmp_path / "d.html"
    assert render(meta, bulk, out) == out.stat().st_size
    p = Page(browser, out, "#mlp/L3.mlp.7")
    p.page.wait_for_function("() => document.getElementById('detail').dataset.feature === 'mlp/L3.mlp.7'")
    assert p.page.text_content("#d-explanation") == "feature 7 odd"
    titles = p.page.locator(".ctx .tok").evaluate_all("s => s.map(x => x.title)")
    # int8 steps of 1/127 shown with 3 decimals; the selected token exactly
    assert titles == ['act 0.504  "a"', 'act -1  " b"', 'act 0.000  "\\n"', 'act 0.252  "é"']
    assert p.page.locator(".ctx .tok.hl").count() == 3
    assert len(p.rows()) == 200 and p.count() == n
    for shown in (400, 450):
        p.page.click("#more")
        assert len(p.rows()) == shown
    assert p.page.locator("#more").is_hidden()
    p.page.fill("#search", "odd")
    assert p.count() == n // 2 and len(p.rows()) == 200 and p.page.locator("#more").is_visible()
    p.page.select_option("#f-layer", "3")
    assert p.rows() == [f"mlp/L3.mlp.{i}" for i in range(n) if i % 4 == 3 and i % 2 == 1]
    p.clean()
    p.context.close()


def test_dead_latents_appear_nowhere(dashboard: tuple[Path, Any]):
    """Latents not in alive.json (here: ones that do fire, declared dead) are in no contexts table, label
    set, category assignment or dashboard entry, and every stage reports how many it left out."""
    from lorascope import tracking

    root, info = dashboard
    doc = json.loads((root / "models/sae/alive.json").read_text())
    alive, d_sae = set(doc["alive_latents"]), doc["d_sae"]
    dead = set(range(d_sae)) - alive
    assert len(dead) >= KILLED
    for table in (
        "data/contexts/sae.parquet",
        "data/contexts/sae.features.parquet",
        "data/interp/sae.parquet",
    ):
        rows = pq.read_table(root / table, columns=["feature", "feature_name"]).to_pylist()
        assert rows and not {r["feature"] for r in rows} & dead, table
        assert all(r["feature_name"] == f"sae.{r['feature']}" for r in rows)
    meta = pq.read_schema(root / "data/contexts/sae.features.parquet").metadata
    assert json.loads(meta[b"lorascope.latents"]) == {"d_sae": d_sae, "alive": len(alive), "dead": len(dead)}
    assigned = pq.read_table(root / "data/interp/categories/assignments.parquet").to_pylist()
    assert [r for r in assigned if r["source"] == "sae"] and not {
        r["feature"] for r in assigned if r["source"] == "sae"} & dead  # fmt: skip
    categories = json.loads((root / "data/interp/categories/categories.json").read_text())
    assert categories["sae_latents"]["alive"] == len(alive)
    fig2 = json.loads((root / "data/interp/categories/figure2.json").read_text())
    assert fig2["latents"]["dead"] == len(dead) and fig2["dead_mass"] > 0  # they fire, and are left out
    meta, _ = decode(info.path)
    shown = {f["id"] for f in meta["features"] if f["source"] == "sae"}
    assert shown and not shown & dead
    assert meta["sae_latents"] == {
        "d_sae": d_sae,
        "alive": len(alive),
        "dead": len(dead),
        "dead_labels_dropped": 0,
    }
    c = tracking.client()
    runs = {
        stage: c.search_runs([tracking.experiment_id(stage)], order_by=["attributes.start_time DESC"])
        for stage in ("contexts", "autointerp", "categorize")
    }
    ctx_run = next(r for r in runs["contexts"] if r.data.tags.get("contexts.source") == "sae")
    ai_run = next(r for r in runs["autointerp"] if r.data.tags.get("autointerp.source") == "sae")
    assert ctx_run.data.metrics["dead_latents_skipped"] == len(dead)
    assert ai_run.data.metrics["sae_dead_latents"] == len(dead) and ai_run.data.metrics[
        "sae_live_latents"
    ] == len(alive)
    assert runs["categorize"][0].data.metrics["sae_dead_latents"] == len(dead)
