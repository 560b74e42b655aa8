"""The categorize stage: categories, one assignment per ok feature, SAE subcategories, Figure 1 against hand
counts, Figure 2 against numpy over the store, unknown ids over a real OpenAI-API server, cache re-runs, errors."""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorascope import tracking
from lorascope.autointerp.labels import LABEL_COLUMNS
from lorascope.errors import LorascopeError

from tests.conftest import Prepared, make_workspace, run_of, tiny_params
from tests.llm_server import LlmServer, Reply

EXPECTED = {  # explanation -> the heuristic's category (the character class of its first quoted token)
    "[heuristic] fires on 'Wait'": "reasoning_word",
    "[heuristic] fires on '\\n'": "whitespace_or_newline",
    "[heuristic] fires on '7'": "digits",
    "[heuristic] fires on ','": "punctuation",
    "[heuristic] fires on 'apple'": "other_word",
    "[heuristic] fires on '<|im_start|>'": "special_marker",
}
CYCLE = list(EXPECTED)
SAE_PLAN = [CYCLE[0]] * 12 + [CYCLE[2]] * 8 + CYCLE  # two categories with >= 5 SAE features
DENSITY_TOKENS = 10**7  # beyond the stores: every document drawn (test_figures_data checks the random draw)
FILES = ("categories.json", "assignments.parquet", "figure1.json", "figure2.json", "figure2_lora.json")
SAE_LATENTS, SAE_ALIVE = 32, 28  # latents 28..31 are dead (not in alive.json)


# --------------------------------------------------------------------------------------- workspace
@pytest.fixture(scope="module")
def built(prepared: Prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LoRA and MLP stores and their contexts (in-process), plus SAE contexts made from the LoRA ones."""
    from lorascope.contexts.stage import CONTEXTS_SCHEMA
    from lorascope.contexts.stage import run as contexts
    from lorascope.extract.stage import run as extract

    from tests.extract.test_extract import make_adapter

    root = make_workspace(tmp_path_factory.mktemp("categorize"))
    shutil.copytree(prepared.root / "models" / "base", root / "models" / "base")
    shutil.copytree(prepared.root / "data" / "prepared", root / "data" / "prepared")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASCOPE_ROOT", str(root))
        make_adapter(root)
        params = tiny_params()
        for source in ("lora", "mlp"):
            extract(params, source)
            contexts(params, source)
    # SAE contexts: each LoRA feature sign as an unsigned latent (the categorize stage only reads tops)
    lora = pq.read_table(root / "data/contexts/lora.parquet").to_pylist()
    names = [n for *_, n in sorted({(r["feature"], -r["sign"], r["feature_name"]) for r in lora})]
    latent = {n: i for i, n in enumerate(names)}
    rows = []
    for r in lora:
        if r["feature_name"] in latent:
            s = r["sign"]
            rows.append({**r, "feature": latent[r["feature_name"]], "feature_name": f"sae.{latent[r['feature_name']]}",
                         "sign": 1, "activation": s * r["activation"], "window_acts": [s * a for a in r["window_acts"]]})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=CONTEXTS_SCHEMA), root / "data/contexts/sae.parquet")
    write_sae(root, json.loads((root / "data/activations/lora/index.json").read_text())["components"])
    return root


def write_sae(root: Path, components: list[str]) -> None:
    """A random SAE over the LoRA store's components (``models/sae``: weights, cfg with a per-component
    scale that is not 1, alive.json listing latents 0..SAE_ALIVE-1); latent 0 decodes to L1.k_proj only."""
    import torch
    from safetensors.torch import save_file

    from lorascope.sae.model import BatchTopKSAE

    sae = BatchTopKSAE(len(components), SAE_LATENTS, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sae.W_enc_DF.mul_(8.0)  # codes of a useful size on the tiny store
        sae.W_dec_FD[0] = 0.0
        sae.W_dec_FD[0, components.index("L1.k_proj")] = 2.5
        sae.threshold.fill_(0.05)
    folder = root / "models/sae"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(folder / "sae.safetensors"))
    scale = [0.5 + 0.25 * (i % 5) for i in range(len(components))]
    cfg = {"d_in": len(components), "d_sae": SAE_LATENTS, "k": 2, "components": components, "scale": scale}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder / "alive.json").write_text(
        json.dumps({"alive_latents": list(range(SAE_ALIVE)), "d_sae": SAE_LATENTS})
    )


def numpy_sae_figure2(root: Path, members: dict[int, str], ids: list[str], n_tokens: int) -> dict:
    """Figure 2 of the SAE latents recomputed with numpy from the safetensors file: encode, sum the
    activations per latent, split each over (layer, type) cells by w^2 / sum w^2 with w = W_dec / scale."""
    from safetensors.numpy import load_file

    w = load_file(str(root / "models/sae/sae.safetensors"))
    cfg = json.loads((root / "models/sae/cfg.json").read_text())
    acts_TC, components = numpy_mass(root, "lora", n_tokens)
    pre = np.maximum((acts_TC - w["b_dec_D"].astype(np.float64)) @ w["W_enc_DF"].astype(np.float64)
                     + w["b_enc_F"].astype(np.float64), 0)  # fmt: skip
    code = np.where(pre > float(w["threshold"]), pre, 0.0)
    mass_F = code.sum(0)
    wdec = w["W_dec_FD"].astype(np.float64) / np.array(cfg["scale"])[None, :]
    share = wdec**2 / (wdec**2).sum(1, keepdims=True)
    cells: dict[tuple[int, str], dict[str, float]] = {}
    for c, name in enumerate(components):
        layer, kind = int(name.split(".")[0][1:]), name.split(".")[1]
        cell = cells.setdefault((layer, kind), dict.fromkeys(ids, 0.0))
        for f, category in members.items():
            cell[category] += mass_F[f] * share[f, c]
    overall = dict.fromkeys(ids, 0.0)
    for f, category in members.items():
        overall[category] += mass_F[f]
    return {"cells": cells, "overall": overall, "mass_F": mass_F}


@pytest.fixture
def ws(built: Path, workspace: Path) -> Path:
    for part in ("models", "data"):
        shutil.copytree(built / part, workspace / part, dirs_exist_ok=True)
    return workspace


def features_of(root: Path, source: str) -> list[tuple[int, str, int]]:
    """``(feature, feature_name, sign)`` of every feature with top contexts in the source's contexts (what
    autointerp labels: a sign that never fires has none), in a fixed order."""
    rows = pq.read_table(
        root / f"data/contexts/{source}.parquet", columns=["feature", "feature_name", "sign", "kind"]
    )
    cols = [rows.column(c).to_pylist() for c in ("feature", "feature_name", "sign", "kind")]
    return sorted({(f, n, s) for f, n, s, kind in zip(*cols, strict=True) if kind == "top"})


def write_labels(root: Path, source: str, plan: list[str], failed_every: int = 7) -> dict[str, str]:
    """A label set in the autointerp schema: feature k gets ``plan[k % len(plan)]``, every ``failed_every``-th
    one fails. Returns ``{feature_name: explanation}`` of the ok rows."""
    rows, ok = [], {}
    for k, (fid, name, sign) in enumerate(features_of(root, source)):
        failed = k % failed_every == failed_every - 1
        explanation = None if failed else plan[k % len(plan)]
        row = dict.fromkeys(LABEL_COLUMNS)
        row.update(source=source, feature=fid, feature_name=name, sign=sign, explanation=explanation,
                   status="failed" if failed else "ok", error="boom" if failed else None, raw_response="")  # fmt: skip
        rows.append(row)
        if not failed:
            ok[name] = explanation
    table = pa.table({c: [r[c] for r in rows] for c in LABEL_COLUMNS})
    path = root / f"data/interp/{source}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return ok


def outputs(root: Path) -> dict[str, bytes]:
    return {f: (root / "data/interp/categories" / f).read_bytes() for f in FILES}


def categorize_run(root: Path):
    """The latest run that logged ``data/interp/categories`` as it is now."""
    return tracking.client().get_run(run_of(root, "data/interp/categories"))


def numpy_mass(root: Path, source: str, n_tokens: int) -> np.ndarray:
    """The rows of the store's activations Figure 2 sums over when ``n_tokens`` covers the store: all but the
    SAE's excluded tokens (every document's first, the special tokens), read with safetensors' numpy API."""
    from safetensors.numpy import load_file

    folder = root / "data/activations" / source
    index = json.loads((folder / "index.json").read_text())
    assert n_tokens >= index["tokens"]
    shards = [load_file(str(folder / s["file"])) for s in index["shards"]]
    acts = np.concatenate([s["acts_TC"] for s in shards]).astype(np.float64)
    ids = np.concatenate([s["token_ids_T"] for s in shards])
    keep = ~np.isin(ids, index["special_token_ids"])
    keep[[start for _, start, _ in index["documents"]]] = False
    return acts[keep], index["components"]


# ------------------------------------------------------------------------------------------ tests
def test_categories_assignments_figures_and_cached_rerun(ws: Path):
    from lorascope.categorize.stage import run

    labels = {s: write_labels(ws, s, CYCLE) for s in ("lora", "mlp")}
    labels["sae"] = write_labels(ws, "sae", SAE_PLAN, failed_every=1000)
    params = tiny_params(categorize={"density_tokens": DENSITY_TOKENS})
    out = run(params)
    assert out == ws / "data/interp/categories"

    doc = json.loads((out / "categories.json").read_text())
    ids = [c["string_id"] for c in doc["categories"]]
    assert params.categorize.min_categories <= len(ids) <= params.categorize.max_categories
    assert set(EXPECTED.values()) <= set(ids)
    assert doc["generation"]["backend"] == "heuristic" and doc["generation"][
        "raw_response"
    ].lstrip().startswith("{")
    n_each = min(params.categorize.sample_size // 2, len(labels["lora"]), len(labels["mlp"]))
    assert doc["generation"]["explanations_shown"] == 2 * n_each
    assert doc["generation"]["explanations_shown_per_source"] == {"lora": n_each, "mlp": n_each}
    assert len(doc["generation"]["prompt_hash"]) == 64

    # every ok feature exactly once, failed ones left out, each in its category
    table = pq.read_table(out / "assignments.parquet").to_pylist()
    got = [(r["source"], r["feature_name"]) for r in table]
    assert len(got) == len(set(got))
    assert sorted(got) == sorted((s, n) for s, names in labels.items() for n in names)
    assert {r["status"] for r in table} == {"ok"}
    for r in table:
        assert r["category"] == EXPECTED[labels[r["source"]][r["feature_name"]]]

    # SAE subcategories: only the two categories with >= min_categories SAE features
    subs = {c["string_id"]: c["sae_subcategories"] for c in doc["categories"]}
    made = {k for k, v in subs.items() if v["status"] == "ok"}
    assert made == {"reasoning_word", "digits"}
    sae_hand = {i: sum(EXPECTED[e] == i for e in labels["sae"].values()) for i in ids}
    assert all(subs[i]["features"] == n for i, n in sae_hand.items())
    assert subs["punctuation"]["status"] == "too_few_features"
    for r in table:
        if r["source"] == "sae" and r["category"] in made:
            assert r["subcategory_status"] == "ok"
            assert r["subcategory"] in {c["string_id"] for c in subs[r["category"]]["categories"]}
        else:
            assert r["subcategory"] is None and r["subcategory_status"] is None

    # Figure 1 against hand counts
    fig1 = json.loads((out / "figure1.json").read_text())
    for source, names in labels.items():
        hand = {i: sum(EXPECTED[e] == i for e in names.values()) for i in ids}
        counts = {row["string_id"]: row["counts"][source] for row in fig1["categories"]}
        shares = [row["shares"][source] for row in fig1["categories"]]
        assert counts == hand
        assert sum(shares) == pytest.approx(1.0)
        assert fig1["totals"][source] == {"assigned": len(names), "uncategorized": 0, "failed": 0}
    sub_rw = next(s for s in fig1["sae_subcategories"] if s["category"] == "reasoning_word")
    assert sub_rw["subcategorized"] == sae_hand["reasoning_word"] and sum(
        s["share"] for s in sub_rw["subcategories"]
    ) == pytest.approx(1)

    # Figure 2 of the LoRA directions and MLP neurons against an independent numpy computation over the stores
    fig2 = json.loads((out / "figure2_lora.json").read_text())
    assert "sum to 1" in fig2["normalisation"]
    for source in ("lora", "mlp"):
        acts_TC, components = numpy_mass(ws, source, DENSITY_TOKENS)
        assert fig2[source]["tokens"] == len(acts_TC) < fig2[source]["drawn_tokens"]
        assert fig2[source]["excluded"]["first_position"] == fig2[source]["documents"] > 0
        assert fig2[source]["excluded"]["special_tokens"] > 0
        expected: dict[tuple, dict[str, float]] = {}
        for _fid, name, sign in features_of(ws, source):
            if name not in labels[source]:
                continue
            col = components.index(name.rstrip("+-"))  # both sources are signed
            layer, kind = int(components[col].split(".")[0][1:]), components[col].split(".")[1]
            cell = (layer, kind) if source == "lora" else (layer,)
            category = EXPECTED[labels[source][name]]
            mass = np.maximum(sign * acts_TC[:, col], 0).sum()
            expected.setdefault(cell, dict.fromkeys(ids, 0.0))[category] += mass
        cells = {
            (c["layer"], c["component_type"]) if source == "lora" else (c["layer"],): c
            for c in fig2[source]["cells"]
        }
        assert set(cells) == set(expected)
        for key, mass in expected.items():
            total = sum(mass.values())
            for category in ids:
                assert cells[key]["mass"][category] == pytest.approx(mass[category], rel=1e-9, abs=1e-9)
                assert cells[key]["density"][category] == pytest.approx(mass[category] / total, rel=1e-9)
            assert sum(cells[key]["density"].values()) == pytest.approx(1.0)
    assert len(fig2["lora"]["cells"]) == 2 * 7 and len(fig2["mlp"]["cells"]) == 2

    # Figure 2 of the paper: the SAE latents, cell by cell against numpy (encode, attribute by w^2 / sum w^2)
    sae2 = json.loads((out / "figure2.json").read_text())
    assert sae2["features"] == "sae" and "W_dec[f, c] / scale[c]" in sae2["attribution"]
    members = {int(n.split(".")[1]): EXPECTED[e] for n, e in labels["sae"].items()}
    assert max(members) < SAE_ALIVE
    want = numpy_sae_figure2(ws, members, ids, DENSITY_TOKENS)
    assert sae2["tokens"] == fig2["lora"]["tokens"] and sae2["latents"] == {
        "d_sae": SAE_LATENTS,
        "alive": SAE_ALIVE,
        "dead": SAE_LATENTS - SAE_ALIVE,
        "categorized": len(members),
    }
    assert sae2["dead_mass"] == pytest.approx(want["mass_F"][SAE_ALIVE:].sum(), rel=1e-5, abs=1e-6)
    assert sae2["dead_mass"] > 0  # the dead latents do fire here: left out all the same
    got_cells = {(c["layer"], c["component_type"]): c for c in sae2["cells"]}
    assert list(got_cells) == [
        (n, k)
        for n in (0, 1)
        for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ]
    for key, mass in want["cells"].items():
        total = sum(mass.values())
        for category in ids:
            assert got_cells[key]["mass"][category] == pytest.approx(mass[category], rel=1e-5, abs=1e-6)
            if total > 0:
                assert got_cells[key]["density"][category] == pytest.approx(mass[category] / total, rel=1e-5)
    total = sum(want["overall"].values())
    for category in ids:
        assert sae2["overall"]["mass"][category] == pytest.approx(want["overall"][category], rel=1e-5)
        assert sae2["overall"]["density"][category] == pytest.approx(
            want["overall"][category] / total, rel=1e-5
        )
    # orientation: latent 0 decodes to L1.k_proj only, so layer 1 / k_proj holds its whole mass
    cat0 = members[0]
    k_cell = got_cells[(1, "k_proj")]["mass"][cat0]
    assert want["mass_F"][0] > 0 and k_cell >= want["mass_F"][0] * (1 - 1e-5)
    assert got_cells[(0, "k_proj")]["mass"][cat0] < k_cell and got_cells[(1, "q_proj")]["mass"][cat0] < k_cell
    cells_sum = sum(sum(c["mass"].values()) for c in sae2["cells"])
    assert cells_sum == pytest.approx(sum(sae2["overall"]["mass"].values()), rel=1e-9)  # cells partition it
    (sub_rw2,) = [x for x in sae2["subcategories"] if x["category"] == "reasoning_word"]
    sub_hand: dict[str, float] = {}
    for r in table:
        if r["source"] == "sae" and r["category"] == "reasoning_word":
            f = int(r["feature_name"].split(".")[1])
            sub_hand[r["subcategory"]] = sub_hand.get(r["subcategory"], 0.0) + want["mass_F"][f]
    assert sub_rw2["mass"] == pytest.approx({k: sub_hand.get(k, 0.0) for k in sub_rw2["mass"]}, rel=1e-5)
    assert sum(sub_rw2["density"].values()) == pytest.approx(1.0)

    # lineage, metrics, tags, artifacts
    assert {p.name for p in out.iterdir()} == set(FILES)  # no lineage file among the outputs
    first = categorize_run(ws)
    assert first.data.tags["lorascope.stage"] == "categorize"
    assert {k: v for k, v in first.data.tags.items() if k.startswith("dvc.out.")} == {
        "dvc.out.data/interp/categories": tracking.dvc_md5(out)
    }
    assert first.data.metrics["categories"] == len(ids)
    assert (
        first.data.metrics["assigned_lora"] == len(labels["lora"])
        and first.data.metrics["uncategorized"] == 0
    )
    assert first.data.metrics["requests"] > 0
    tags = first.data.tags
    assert tags["categorize.assign.backend"] == "heuristic" and "upstream.contexts" in " ".join(tags)
    assert tags["categorize.prompt_hash.categorize"] == doc["assignment"]["prompt_hash"]
    artifacts = {a.path for a in tracking.client().list_artifacts(first.info.run_id, "categories")}
    assert {f"categories/{f}" for f in FILES} <= artifacts

    # a re-run answers everything from the cache and writes the same files
    before = outputs(ws)
    run(params)
    second = categorize_run(ws)
    assert second.info.run_id != first.info.run_id
    assert second.data.metrics["requests"] == 0 and second.data.metrics["cache_hits"] > 0
    assert outputs(ws) == before


def test_unknown_id_is_reasked_then_uncategorized(ws: Path, monkeypatch: pytest.MonkeyPatch):
    """A real OpenAI-API server answers the assignment; one feature gets an unknown id twice."""
    from lorascope.categorize.stage import run

    secret = "test-key-" + secrets.token_hex(12)
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    odd = "[heuristic] fires on 'zebra'"
    labels = {s: write_labels(ws, s, CYCLE) for s in ("lora", "mlp")}
    target = next(iter(labels["mlp"]))
    table = pq.read_table(ws / "data/interp/mlp.parquet").to_pylist()
    for r in table:
        if r["feature_name"] == target:
            r["explanation"] = odd
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(ws / "data/interp/mlp.parquet")),
                   ws / "data/interp/mlp.parquet")  # fmt: skip

    def responder(api, prompt: str, index: int) -> Reply:
        return Reply("no_such_category" if odd in prompt else "`digits`")

    with LlmServer(responder) as srv:
        assign = {"backend": "openai-compatible", "model": "local-model", "base_url": f"{srv.url}/v1",
                  "max_retries": 0, "concurrency": 4}  # fmt: skip
        params = tiny_params(categorize={"assign": assign})
        out = run(params)
        n_features = len(labels["lora"]) + len(labels["mlp"])
        asked = [r.prompt for r in srv.requests if odd in r.prompt]
        assert len(asked) == 2 and "could not be used" in asked[1]
        assert srv.count() == n_features + 1
        rows = {
            r["feature_name"]: r
            for r in pq.read_table(out / "assignments.parquet").to_pylist()
            if r["source"] == "mlp"
        }
        bad = rows[target]
        assert bad["status"] == "uncategorized" and bad["category"] is None
        assert (
            bad["raw_response"] == "no_such_category\n---\nno_such_category" and "not one of" in bad["error"]
        )
        assert all(r["category"] == "digits" for n, r in rows.items() if n != target)
        fig1 = json.loads((out / "figure1.json").read_text())
        assert fig1["totals"]["mlp"]["uncategorized"] == 1
        assert sum(r["shares"]["mlp"] for r in fig1["categories"]) == pytest.approx(1.0)
        first = categorize_run(ws)
        assert (
            first.data.metrics["uncategorized"] == 1 and first.data.metrics["requests"] == n_features + 1 + 1
        )  # + generation
        before = outputs(ws)
        run(params)  # cached: the server hears nothing new
        assert srv.count() == n_features + 1 and outputs(ws) == before
    logged = json.dumps([first.data.params, first.data.tags])
    assert secret not in logged


def test_generation_failure_is_fatal_and_keeps_the_reply(ws: Path):
    from lorascope.categorize.stage import GENERATION_REPLY, run

    for s in ("lora", "mlp"):
        write_labels(ws, s, CYCLE)
    with LlmServer(lambda *_: Reply('{"categories": []}')) as srv:
        generate = {
            "backend": "openai-compatible",
            "model": "local-model",
            "base_url": f"{srv.url}/v1",
            "max_retries": 0,
        }
        with pytest.raises(LorascopeError) as raised:
            run(tiny_params(categorize={"generate": generate}))
        assert srv.count() == 2  # asked, then re-asked once
    message = str(raised.value)
    assert "\n" not in message and message.startswith("category generation failed:")
    assert "0 categories, expected 5 to 8" in message and str(ws / GENERATION_REPLY) in message
    assert (ws / GENERATION_REPLY).read_text().count('{"categories": []}') == 2
    assert not (ws / "data/interp/categories").exists()


def test_missing_inputs_are_one_line_errors(ws: Path):
    from lorascope.categorize.stage import run

    write_labels(ws, "lora", CYCLE)
    with pytest.raises(LorascopeError) as raised:
        run(tiny_params())
    message = str(raised.value)
    assert "\n" not in message and "data/interp/mlp.parquet" in message
    assert "`lorascope autointerp --source mlp`" in message
    write_labels(ws, "mlp", CYCLE)
    (ws / "data/contexts/mlp.parquet").unlink()
    with pytest.raises(LorascopeError, match=r"data/contexts/mlp.parquet: contexts not found.*--source mlp"):
        run(tiny_params())


def test_on_the_autointerp_stage_label_sets(ws: Path):
    """The real upstream: heuristic label sets from the autointerp stage, lineage back to them."""
    from lorascope.autointerp.stage import run as autointerp
    from lorascope.categorize.stage import run

    params = tiny_params()
    for source in ("lora", "mlp"):
        autointerp(params, source)
    out = run(params)
    ok = {
        (s, r["feature_name"])
        for s in ("lora", "mlp")
        for r in pq.read_table(ws / f"data/interp/{s}.parquet").to_pylist()
        if r["status"] == "ok"
    }
    got = [(r["source"], r["feature_name"]) for r in pq.read_table(out / "assignments.parquet").to_pylist()]
    assert ok and sorted(got) == sorted(ok)
    tags = categorize_run(ws).data.tags
    assert {"upstream.autointerp", "upstream.autointerp.mlp", "upstream.contexts", "upstream.extract"} <= set(
        tags
    )


def test_failed_requests_and_failed_subcategories_are_recorded(ws: Path):
    """Over a real server answering as the heuristic would: a request that fails for good is ``failed`` (and
    asked again by a re-run: failures are not cached); a subcategory set that cannot be generated is recorded
    and leaves its features without a subcategory, while the rest of the stage stands."""
    import asyncio

    from lorascope.categorize.stage import run
    from lorascope.labelling.heuristic import HeuristicClient
    from lorascope.labelling.prompts import template

    broken, refused = "[heuristic] fires on '7' in tables", "[heuristic] fires on 'refused'"
    labels = {s: write_labels(ws, s, CYCLE) for s in ("lora", "mlp")}
    labels["sae"] = write_labels(ws, "sae", [broken] * 6 + [CYCLE[0]] * 6 + [refused], failed_every=1000)
    generation = template("categories").partition("\n")[0]

    def responder(api, prompt: str, index: int) -> Reply:
        if broken in prompt and prompt.startswith(generation):
            return Reply("these are not categories")
        if refused in prompt:
            return Reply("refused", status=400)
        reply = asyncio.run(HeuristicClient().complete(prompt, max_tokens=1, temperature=None))
        return Reply(reply.text)

    with LlmServer(responder) as srv:
        client = {"backend": "openai-compatible", "base_url": f"{srv.url}/v1", "max_retries": 0}
        params = tiny_params(
            categorize={"generate": {**client, "model": "gen"}, "assign": {**client, "model": "asg"}}
        )
        out = run(params)
        rows = {
            r["feature_name"]: r
            for r in pq.read_table(out / "assignments.parquet").to_pylist()
            if r["source"] == "sae"
        }
        failed = [r for r in rows.values() if r["status"] == "failed"]
        assert len(failed) == sum(e == refused for e in labels["sae"].values()) > 0
        assert all(r["category"] is None and "HTTP 400" in r["error"] for r in failed)
        subs = {
            c["string_id"]: c["sae_subcategories"]
            for c in json.loads((out / "categories.json").read_text())["categories"]
        }
        assert (
            subs["digits"]["status"] == "failed"
            and "these are not categories" in subs["digits"]["raw_response"]
        )
        assert subs["reasoning_word"]["status"] == "ok"
        for r in rows.values():
            assert (r["subcategory"] is not None) == (r["category"] == "reasoning_word")
        fig1 = json.loads((out / "figure1.json").read_text())
        assert fig1["totals"]["sae"]["failed"] == len(failed)
        assert [s["category"] for s in fig1["sae_subcategories"]] == ["reasoning_word"]
        before = srv.count(), outputs(ws)
        run(params)
        assert srv.count() == before[0] + len(failed) and outputs(ws) == before[1]


def latest_run(stage: str):
    """The newest MLflow run of ``stage`` (found by experiment, not by any file the stage writes)."""
    c = tracking.client()
    (found,) = c.search_runs(
        [tracking.experiment_id(stage)], order_by=["attributes.start_time DESC"], max_results=1
    )
    return found


def test_dead_latent_labels_are_dropped_and_counted(ws: Path):
    """A label set older than the SAE: a label of a latent that alive.json does not list is dropped (never
    categorized, never in Figure 2) and counted; the category sample is an equal number per source."""
    from lorascope.categorize.stage import run

    labels = {s: write_labels(ws, s, CYCLE) for s in ("lora", "mlp")}
    labels["sae"] = write_labels(ws, "sae", SAE_PLAN, failed_every=1000)
    # latent 3 is declared dead: its label (and contexts) are now stale
    alive = [i for i in range(SAE_ALIVE) if i != 3]
    (ws / "models/sae/alive.json").write_text(json.dumps({"alive_latents": alive, "d_sae": SAE_LATENTS}))
    params = tiny_params(categorize={"density_tokens": 1000, "sample_size": 10, "sae_subcategories": False})
    out = run(params)
    rows = pq.read_table(out / "assignments.parquet").to_pylist()
    sae_names = {r["feature_name"] for r in rows if r["source"] == "sae"}
    assert "sae.3" not in sae_names and sae_names == set(labels["sae"]) - {"sae.3"}
    doc = json.loads((out / "categories.json").read_text())
    assert doc["sae_latents"]["alive"] == SAE_ALIVE - 1 and doc["sae_latents"]["dead_labels_dropped"] == 1
    assert doc["generation"]["explanations_shown_per_source"] == {"lora": 5, "mlp": 5}
    assert doc["generation"]["explanations_shown"] == 10
    fig2 = json.loads((out / "figure2.json").read_text())
    assert fig2["latents"]["dead"] == SAE_LATENTS - SAE_ALIVE + 1
    assert fig2["latents"]["categorized"] == len(sae_names)
    metrics = latest_run("categorize").data.metrics
    assert metrics["sae_dead_labels_dropped"] == 1 and metrics["sae_live_latents"] == SAE_ALIVE - 1
    assert metrics["truncated"] == 0
    before = outputs(ws)
    run(params)
    assert outputs(ws) == before  # deterministic: a cached re-run writes the same bytes


def test_category_sample_has_equal_numbers_per_source():
    from lorascope.categorize.generation import sample_equal

    pools = {"lora": [f"lora {i}" for i in range(40)], "mlp": [f"mlp {i}" for i in range(300)]}
    shown, per_source = sample_equal(pools, 200, seed=0)
    assert per_source == {"lora": 40, "mlp": 40} and len(shown) == 80  # the smaller pool bounds both
    assert sum(s.startswith("lora") for s in shown) == sum(s.startswith("mlp") for s in shown) == 40
    assert len(set(shown)) == 80 and set(shown) <= set(pools["lora"]) | set(pools["mlp"])
    shown, per_source = sample_equal(pools, 31, seed=1)
    assert per_source == {"lora": 15, "mlp": 15} and len(shown) == 30
    assert sum(s.startswith("lora") for s in shown) == 15
    assert shown == sample_equal(pools, 31, seed=1)[0] != sample_equal(pools, 31, seed=2)[0]
    kinds = [s.split()[0] for s in shown]
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)  # mixed, not source by source


def test_mlp_neurons_are_features_per_sign_like_lora_directions(built: Path):
    """A SiLU-gated neuron takes both signs, so the MLP baseline is read as the LoRA directions are: each
    neuron is two features (``L0.mlp.3+`` / ``L0.mlp.3-``), each sign's max from the store itself."""

    stats = pq.read_table(built / "data/contexts/mlp.features.parquet").to_pylist()
    # the tokens contexts.exclude keeps (as sae.exclude): not a document's first token, not a special token
    acts_TC, components = numpy_mass(built, "mlp", 10**9)
    assert len(stats) == 2 * len(components)
    for r in stats:
        name = components[r["feature"]]
        assert r["feature_name"] == name + ("+" if r["sign"] > 0 else "-")
        expected = float((r["sign"] * acts_TC[:, r["feature"]]).max())
        assert r["max"] == pytest.approx(expected, rel=1e-6)
    assert (acts_TC < 0).mean() > 0.05 and (acts_TC > 0).mean() > 0.05  # both signs are common
    assert {
        r["sign"] for r in pq.read_table(built / "data/contexts/mlp.parquet", columns=["sign"]).to_pylist()
    } == {1, -1}
