"""The autointerp stage on real contexts: the heuristic baseline, the official SDKs against a local
server (retries, malformed replies, failures, cache, keys), detection scoring and bad input."""

from __future__ import annotations

import json
import re
import secrets
import shutil
from pathlib import Path

import pandas as pd
import pytest

from llm_server import LlmServer, Reply
from lorascope import tracking
from lorascope.autointerp.labelling import LABEL_COLUMNS
from lorascope.autointerp.stage import balanced_accuracy, layer_component, load_features, run
from lorascope.errors import LorascopeError
from lorascope.tracking import client as mlflow_client
from lorascope.tracking import producer

from conftest import REPO, Prepared, cli, make_workspace, run_of, tiny_params

SECRET = "test-key-" + secrets.token_hex(12)  # made per run: no key-like literal in the repo


@pytest.fixture(scope="module")
def contexts_root(prepared: Prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace where extract (lora, with a random adapter) and contexts ran once for the module."""
    from lorascope.contexts.stage import run as contexts
    from lorascope.extract.stage import run as extract
    from test_extract import make_adapter

    root = make_workspace(tmp_path_factory.mktemp("interp"))
    for d in ("models/base", "data/prepared"):
        shutil.copytree(prepared.root / d, root / d)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASCOPE_ROOT", str(root))
        make_adapter(root)
        extract(tiny_params(), "lora")
        contexts(tiny_params(), "lora")
    return root


@pytest.fixture
def ws(contexts_root: Path, workspace: Path) -> Path:
    shutil.copytree(contexts_root / "data/contexts", workspace / "data/contexts")
    return workspace


def run_id_of(path: Path) -> str:
    """The latest run that logged ``path`` (in the test's workspace) as its output."""
    made_by = producer(path)
    assert made_by is not None and made_by["stage"] == "autointerp", path
    return made_by["run_id"]


def metrics_of(path: Path) -> dict[str, float]:
    return mlflow_client().get_run(run_id_of(path)).data.metrics


def test_feature_names_and_balanced_accuracy():
    assert layer_component("L3.q_proj+") == (3, "q_proj")
    assert layer_component("L12.down_proj.1-") == (12, "down_proj")
    assert layer_component("L0.mlp.17") == (0, "mlp")
    assert layer_component("sae.42") == (None, None)
    assert balanced_accuracy([True, True, False, True], [True, False, False, False]) == pytest.approx(
        (1 / 1 + 1 / 3) / 2
    )


def test_features_and_their_windows(ws: Path):
    params = tiny_params(autointerp={"n_contexts": 3, "window_before": 2, "window_after": 1})
    features, dead = load_features(params, "lora")
    table = pd.read_parquet(ws / "data/contexts/lora.parquet")
    assert dead == 0 and len(features) == 2 * table.feature.nunique() == 28  # 14 directions x 2 signs
    f = next(f for f in features if f.sign == -1)
    top = (
        table[(table.feature == f.id) & (table.sign == -1) & (table.kind == "top")]
        .sort_values("rank")
        .head(3)
    )
    assert f.max_act == pytest.approx(float((top.activation * f.sign).max())) and f.max_act > 0
    for ex, row in zip(f.top, top.itertuples(), strict=True):
        at = row.position - row.window_start
        assert ex.tokens == list(row.tokens[max(0, at - 2) : at + 2])
        assert ex.acts == pytest.approx([f.sign * a for a in row.window_acts[max(0, at - 2) : at + 2]])
        assert ex.acts[min(at, 2)] == pytest.approx(f.sign * row.activation)  # the activating token
    assert len(f.positives) == len(f.negatives) == params.autointerp.detection_samples


def test_heuristic_label_set_and_cached_rerun(ws: Path):
    params = tiny_params()
    out = run(params, "lora")
    labels = pd.read_parquet(out)
    assert list(labels.columns) == list(LABEL_COLUMNS)
    assert len(labels) == 28 and (labels.status == "ok").all()
    assert labels.explanation.str.startswith("[heuristic]").all()  # clearly not an LLM
    assert set(labels.classification) <= {0, 1, 2} and (labels.model == "heuristic-baseline").all()
    n = 2 * tiny_params().autointerp.detection_samples  # as many activating windows as random ones
    assert labels.detection_balanced_accuracy.between(0, 1).all() and (labels.detection_n == n).all()
    assert set(zip(labels.layer, labels.component, strict=True)) == {
        (layer, c)
        for layer in (0, 1)
        for c in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    }
    first = metrics_of(out)
    assert first["requests"] == 56 and first["cache_hits"] == 0 and first["labelled"] == 28
    assert sum(first[f"class_{c}_share"] for c in (0, 1, 2)) == pytest.approx(1)
    run_ = mlflow_client().get_run(run_id_of(out))
    assert run_.data.tags["upstream.contexts"] == run_of(ws, "data/contexts/lora.parquet")
    assert run_.data.tags["dvc.out.data/interp/lora.parquet"] == tracking.dvc_md5(out)
    assert not out.with_name("lora.run.json").exists()
    assert "heuristic baseline" in run_.data.tags["autointerp.note"]

    again = run(params, "lora")
    assert metrics_of(again)["requests"] == 0 and metrics_of(again)["cache_hits"] == 56
    relabelled = pd.read_parquet(again)
    assert relabelled.cached.all()
    pd.testing.assert_frame_equal(relabelled.drop(columns="cached"), labels.drop(columns="cached"))


def label_json(explanation: str, cls: int) -> str:
    return json.dumps({"explanation": explanation, "classification": cls, "classification_reasoning": "r"})


def test_real_sdks_against_a_local_server(ws: Path, monkeypatch: pytest.MonkeyPatch):
    """openai SDK against a server without structured output (``structured_output: false``): 429 and 500
    retried, a timeout retried, malformed JSON repaired (json-repair), garbage re-asked then recorded as
    failed with its raw text; the key appears nowhere in the run or the outputs."""
    import mlflow

    params = tiny_params(autointerp={"max_features": 6, "detection_samples": 1})
    features, _ = load_features(params, "lora")
    first_text = {f.name: "".join(f.top[0].tokens).replace("\n", "\\n") for f in features}
    plan = {  # feature -> behaviour of its B.1 request
        features[0].name: "429", features[1].name: "500", features[2].name: "timeout",
        features[3].name: "fenced", features[4].name: "garbage",
    }  # fmt: skip
    seen: dict[str, int] = {}

    def responder(api: str, prompt: str, index: int) -> Reply:
        if not prompt.startswith("We're studying neurons"):
            return Reply('{"matches": [1]}')
        name = next(n for n, t in first_text.items() if f"<neuron_activations>\n{t}\n" in prompt)
        n = seen[name] = seen.get(name, 0) + 1
        how = plan.get(name)
        if how == "429" and n == 1:
            return Reply.error(429)
        if how == "500" and n == 1:
            return Reply.error(500)
        if how == "timeout" and n == 1:
            return Reply(label_json("late", 0), delay_s=3)
        if how == "fenced":
            return Reply("Sure! Here it is:\n```json\n{'explanation': 'fenced label', 'classification': '0', "
                         "'classification_reasoning': 'ok',}\n```\nHope that helps.")  # fmt: skip
        if how == "garbage":
            return Reply(f"I cannot decide (attempt {n}).")
        return Reply(label_json(f"label of {name}", 1))

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with LlmServer(responder) as srv:
        cfg = {"backend": "openai-compatible", "model": "gpt-5-mini", "base_url": f"{srv.url}/v1",
               "api_key_env": "OPENAI_API_KEY", "timeout_s": 1.0, "concurrency": 3,
               "structured_output": False}  # fmt: skip
        out = run(tiny_params(autointerp={**params.autointerp.model_dump(), **cfg}), "lora")
        assert not any(r.schema or "response_format" in r.body for r in srv.requests)  # free text asked
        labels = pd.read_parquet(out).set_index("feature_name")
        assert seen[features[0].name] == seen[features[1].name] == seen[features[2].name] == 2  # retried
        assert seen[features[4].name] == 2  # re-asked once
        assert all(r.headers["authorization"] == f"Bearer {SECRET}" for r in srv.requests)
        retried = [r for r in srv.requests if r.headers.get("x-stainless-retry-count", "0") != "0"]
        assert len(retried) == 3
        n_requests = srv.count()
    assert labels.loc[features[0].name, "explanation"] == f"label of {features[0].name}"
    assert labels.loc[features[2].name, "explanation"] == f"label of {features[2].name}"
    fenced = labels.loc[features[3].name]
    assert (fenced.explanation, fenced.classification, fenced.status) == ("fenced label", 0, "ok")
    bad = labels.loc[features[4].name]
    assert bad.status == "failed" and pd.isna(bad.explanation)
    assert "I cannot decide (attempt 1)." in bad.raw_response and "(attempt 2)" in bad.raw_response
    assert bad.error.startswith("unparseable after a re-ask")
    assert (labels.drop(index=features[4].name).detection_n == 2).all()
    metrics = metrics_of(out)
    assert metrics["failed"] == 1 and metrics["retries"] == 3 and metrics["requests"] == n_requests - 3
    # a self-hosted server has no list price (genai-prices knows no provider there): null, with the reason
    tags = mlflow_client().get_run(run_id_of(out)).data.tags
    assert "cost_usd" not in metrics and f"{srv.url}/v1" in tags["autointerp.cost_note"]
    assert labels.cost_usd.isna().all() and tags["autointerp.structured_output"] == "false"

    # the key is in no param, tag, metric name, artifact, output file or cache entry
    run_id = run_id_of(out)
    data = mlflow_client().get_run(run_id).data
    assert SECRET not in json.dumps([data.params, data.tags, list(data.metrics)])
    art = Path(mlflow.artifacts.download_artifacts(run_id=run_id))
    files = [*art.rglob("*"), *out.parent.rglob("*"), *(ws / "checkpoints").rglob("*")]
    assert not [p for p in files if p.is_file() and SECRET.encode() in p.read_bytes()]


def no_json_repair(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any reply goes through json-repair."""
    import json_repair

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a structured reply went through json-repair")

    monkeypatch.setattr(json_repair, "loads", refuse)


def test_anthropic_sdk_backend(ws: Path, monkeypatch: pytest.MonkeyPatch):
    """Anthropic structured output: each request forces the prompt's schema as its one tool, the tool
    call's input is the answer, read without repair; claude-opus-4-1 is priced (genai-prices)."""
    from lorascope.autointerp.prompts import DETECTION_SCHEMA, LABEL_SCHEMA

    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    no_json_repair(monkeypatch)

    def responder(api: str, prompt: str, index: int) -> Reply:
        assert api == "anthropic"
        return Reply(label_json("claude label", 2) if prompt.startswith("We're") else '{"matches": []}')

    with LlmServer(responder) as srv:
        cfg = {"backend": "anthropic", "model": "claude-opus-4-1", "base_url": srv.url, "max_features": 2}
        out = run(tiny_params(autointerp=cfg), "lora")
        assert all(r.path == "/v1/messages" for r in srv.requests) and srv.count() == 4
        schemas = [r.schema for r in srv.requests]
        assert [r.forced_tool for r in srv.requests].count(LABEL_SCHEMA.name) == 2
    assert schemas.count(LABEL_SCHEMA.schema) == schemas.count(DETECTION_SCHEMA.schema) == 2
    labels = pd.read_parquet(out)
    assert (labels.explanation == "claude label").all() and (labels.classification == 2).all()
    assert (labels.detection_balanced_accuracy == 0.5).all()  # said "none": all negatives right, no hits
    assert (labels.raw_response == label_json("claude label", 2)).all()  # the tool input, as JSON text
    assert metrics_of(out)["cost_usd"] > 0 and (labels.cost_usd > 0).all()  # claude-opus-4-1 is priced


def test_structured_output_of_an_openai_compatible_server(ws: Path, monkeypatch: pytest.MonkeyPatch):
    """vLLM's guided decoding through ``response_format``: every JSON request carries its schema, replies
    are read without repair, and one that is not strict JSON is refused (re-asked), never mended."""
    from lorascope.autointerp.prompts import DETECTION_SCHEMA, LABEL_SCHEMA

    no_json_repair(monkeypatch)
    fenced = "```json\n" + label_json("fenced", 0) + "\n```"

    def responder(api: str, prompt: str, index: int) -> Reply:
        if not prompt.startswith("We're studying neurons"):
            return Reply('{"matches": [1, 2]}')
        return Reply(fenced if index == 0 else label_json("strict", 1))

    with LlmServer(responder) as srv:
        cfg = {"backend": "openai-compatible", "model": "Qwen/Qwen2.5-7B-Instruct", "base_url": f"{srv.url}/v1",
               "max_features": 2, "concurrency": 1}  # fmt: skip
        out = run(tiny_params(autointerp=cfg), "lora")
        formats = [r.body["response_format"] for r in srv.requests]
    assert {f["json_schema"]["name"] for f in formats} == {LABEL_SCHEMA.name, DETECTION_SCHEMA.name}
    assert all(f["type"] == "json_schema" and f["json_schema"]["strict"] for f in formats)
    assert [f["json_schema"]["schema"] for f in formats].count(DETECTION_SCHEMA.schema) == 2
    labels = pd.read_parquet(out)
    assert (labels.status == "ok").all() and (labels.explanation == "strict").all()
    assert (labels.detection_n == 2 * tiny_params().autointerp.detection_samples).all()
    first = labels[labels.raw_response.str.contains("fenced")]
    assert len(first) == 1 and first.raw_response.iloc[0].startswith(fenced + "\n---\n")  # re-asked once


def test_cut_replies_are_failures_never_labels(ws: Path, monkeypatch: pytest.MonkeyPatch):
    """A reply cut at max_tokens (finish_reason: length) is a failed label with the partial text, not re-asked,
    not cached, counted in the run's ``truncated`` metric; an uncut reply labels as usual."""
    from lorascope import tracking

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)

    def responder(api: str, prompt: str, index: int) -> Reply:
        return Reply('{"explanation": "the word', cut=True) if index == 1 else Reply(label_json("fine", 0))

    with LlmServer(responder) as srv:
        cfg = {"backend": "openai-compatible", "model": "local", "base_url": f"{srv.url}/v1", "max_retries": 0,
               "max_features": 4, "detection_samples": 0}  # fmt: skip
        out = run(tiny_params(autointerp=cfg), "lora")
        asked = srv.count()
    labels = pd.read_parquet(out).set_index("feature_name")
    cut = labels[labels.raw_response == '{"explanation": "the word']
    assert len(cut) == 1 and (cut.status == "failed").all() and cut.explanation.isna().all()
    assert (
        cut.error.str.contains("finish_reason: length").all()
        and cut.error.str.startswith("request failed").all()
    )
    ok = labels[labels.status == "ok"]
    assert (ok.explanation == "fine").all() and len(ok) + len(cut) == 4
    assert asked == 4  # the cut one is not re-asked
    c = tracking.client()
    (latest,) = c.search_runs([tracking.experiment_id("autointerp")], order_by=["attributes.start_time DESC"],
                              max_results=1)  # fmt: skip
    assert latest.data.metrics["truncated"] == len(cut) and latest.data.metrics["failed"] == len(cut)


def test_missing_key_and_missing_contexts_are_one_line(ws: Path):
    shutil.copy(REPO / "params.yaml", ws)
    env = {"LORASCOPE_ROOT": str(ws), "OPENAI_API_KEY": ""}
    params = ws / "params.yaml"
    params.write_text(
        re.sub(r"(autointerp:.*?\n  backend:) heuristic", r"\1 openai", params.read_text(), flags=re.S)
    )
    res = cli("autointerp", "--source", "lora", cwd=ws, env=env)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: OPENAI_API_KEY is not set (needed by the openai backend)"
    assert not (ws / "data/interp").exists()
    with pytest.raises(
        LorascopeError,
        match=r"data/contexts/mlp.parquet: contexts not found; run `lorascope contexts --source mlp`",
    ):
        run(tiny_params(), "mlp")
