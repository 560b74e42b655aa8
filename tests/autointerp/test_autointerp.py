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

from lorascope import tracking
from lorascope.autointerp import stage
from lorascope.autointerp.labels import LABEL_COLUMNS
from lorascope.autointerp.stage import Feature, balanced_accuracy, layer_component, load_features, run
from lorascope.errors import LorascopeError
from lorascope.labelling.prompts import Example, detection_prompt
from lorascope.tracking import client as mlflow_client
from lorascope.tracking import producer

from tests.conftest import REPO, Prepared, cli, make_workspace, run_of, tiny_params
from tests.llm_server import Api, DetectionPrompt, LlmServer, Reply, answer_detection

SECRET = "test-key-" + secrets.token_hex(12)  # made per run: no key-like literal in the repo


@pytest.fixture(scope="module")
def contexts_root(prepared: Prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace where extract (lora, with a random adapter) and contexts ran once for the module."""
    from lorascope.contexts.stage import run as contexts
    from lorascope.extract.stage import run as extract

    from tests.extract.test_extract import make_adapter

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
    assert labels.class_reasoning.str.startswith("[heuristic] the top token holds").all()
    assert set(labels.classification) <= {0, 1, 2} and (labels.model == "heuristic-baseline").all()
    n = tiny_params().autointerp.detection_samples  # at most n activating windows and n random ones
    features = {f.name: f for f in load_features(tiny_params(), "lora")[0]}
    for r in labels.itertuples():
        f = features[r.feature_name]
        if f.positives:  # scored on the positives the labeller never saw, as many random ones
            assert 0 <= r.detection_balanced_accuracy <= 1 and r.detection_n == len(f.positives) + n
        else:  # every quantile sample was shown to the labeller: nothing fair to score on
            assert pd.isna(r.detection_balanced_accuracy) and r.detection_n == 0
    assert labels.detection_balanced_accuracy.notna().sum() >= 20
    assert set(zip(labels.layer, labels.component, strict=True)) == {
        (layer, c)
        for layer in (0, 1)
        for c in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    }
    first = metrics_of(out)
    asked = 28 + int(
        labels.detection_balanced_accuracy.notna().sum()
    )  # a label each, a detection per scored one
    assert first["requests"] == asked and first["cache_hits"] == 0 and first["labelled"] == 28
    assert first["detection_positives_left_out"] == sum(f.positives_left_out for f in features.values()) > 0
    assert sum(first[f"class_{c}_share"] for c in (0, 1, 2)) == pytest.approx(1)
    run_ = mlflow_client().get_run(run_id_of(out))
    assert run_.data.tags["upstream.contexts"] == run_of(ws, "data/contexts/lora.parquet")
    assert run_.data.tags["dvc.out.data/interp/lora.parquet"] == tracking.dvc_md5(out)
    assert not out.with_name("lora.run.json").exists()
    assert "heuristic baseline" in run_.data.tags["autointerp.note"]

    again = run(params, "lora")
    assert metrics_of(again)["requests"] == 0 and metrics_of(again)["cache_hits"] == asked
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
    from lorascope.labelling.prompts import DETECTION_SCHEMA, LABEL_SCHEMA

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
    from lorascope.labelling.prompts import DETECTION_SCHEMA, LABEL_SCHEMA

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


# Detection scoring against the truth: the server reads each detection prompt and names the snippets that
# contain the explanation's quoted token, so a feature's score follows from which snippets hold its token.
POSITIVES = ["the zebra ran", "a zebra and a lion", "zebra crossing, lion statue", "one zebra\nat dusk"]
NEGATIVES = ["the apple fell", "an apple and a lion", "apple pie", "green apple"]
CASES = {  # feature name -> the explanation its B.1 reply gives, the token it quotes, the score it must get
    "L0.q_proj+": ("fires on the token 'zebra'", "zebra", 1.0),  # correct: every activating snippet, no other
    "L0.k_proj+": ("fires on the token 'apple'", "apple", 0.0),  # wrong: every non-activating one, no other
    "L0.v_proj+": ("fires on 'lion'", "lion", 0.625),  # half right: 2 of 4 activating, 1 of 4 non-activating
    "L0.o_proj+": ("fires on the token 'giraffe'", "giraffe", 0.5),  # in no snippet: says none
}


def hand_score(token: str) -> float:
    """Balanced accuracy by hand: hit rate on POSITIVES and correct-rejection rate on NEGATIVES, averaged."""
    hits = sum(token in s for s in POSITIVES) / len(POSITIVES)
    rejections = sum(token not in s for s in NEGATIVES) / len(NEGATIVES)
    return (hits + rejections) / 2


def test_detection_reader_reads_the_prompt_back():
    """The scripted reader finds the explanation, each snippet under its shown number, and the token."""
    read = DetectionPrompt.read(detection_prompt("fires on 'b'", ["a", "b c", "x\ny b", "none"]))
    assert read is not None and read.explanation == "fires on 'b'" and read.token == "b"
    assert read.snippets == {1: "a", 2: "b c", 3: "x\\ny b", 4: "none"}
    assert read.containing("b") == [2, 3] and read.containing(None) == []
    reply = answer_detection(detection_prompt("no quoted token", ["a"]))
    assert reply is not None and reply.text == '{"matches": []}'
    assert DetectionPrompt.read("We're studying neurons") is None
    assert {name: hand_score(token) for name, (_, token, _) in CASES.items()} == {
        name: score for name, (*_, score) in CASES.items()
    }  # the data gives each case the score it claims


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_detection_scores_follow_the_snippets_content(ws: Path, monkeypatch: pytest.MonkeyPatch, api: Api):
    """Through the real SDK and the stage: a correct explanation scores 1.0, one naming only the
    non-activating windows 0.0, a half-right one 0.625, one in no window 0.5. A stage that swapped
    activating and random windows, ignored the matches or read the numbers off by one would miss these."""
    features = [  # each top window is just the feature's name, so the B.1 reply can tell which is asked
        Feature(
            id=i,
            name=name,
            sign=1,
            max_act=1.0,
            top=[Example([f"[{name}]"], [1.0])],
            positives=list(POSITIVES),
            negatives=list(NEGATIVES),
        )  # fmt: skip
        for i, name in enumerate(CASES)
    ]
    monkeypatch.setattr(stage, "load_features", lambda params, source: (features, 0))
    monkeypatch.setenv("OPENAI_API_KEY" if api == "openai" else "ANTHROPIC_API_KEY", SECRET)

    def responder(api: str, prompt: str, index: int) -> Reply:
        detection = answer_detection(prompt)
        if detection is not None:
            return detection
        name = next(n for n in CASES if f"[{n}]" in prompt)
        return Reply(label_json(CASES[name][0], 0))

    with LlmServer(responder) as srv:
        base_url = f"{srv.url}/v1" if api == "openai" else srv.url
        model = "gpt-4o-mini" if api == "openai" else "claude-sonnet-4-5"
        out = run(tiny_params(autointerp={"backend": api, "model": model, "base_url": base_url}), "lora")
        shown = [read for r in srv.requests if (read := DetectionPrompt.read(r.prompt)) is not None]
    # one detection prompt per feature, each window shown once, numbered from 1 as parse_detection reads them
    n = len(POSITIVES) + len(NEGATIVES)
    assert sorted(read.token for read in shown) == sorted(token for _, token, _ in CASES.values())
    windows = sorted(t.replace("\n", "\\n") for t in POSITIVES + NEGATIVES)  # as the prompt shows them
    for read in shown:
        assert list(read.snippets) == list(range(1, n + 1)) and sorted(read.snippets.values()) == windows
    labels = pd.read_parquet(out).set_index("feature_name")
    assert (labels.status == "ok").all() and (labels.detection_n == n).all()
    assert labels.explanation.to_dict() == {name: explanation for name, (explanation, *_) in CASES.items()}
    assert labels.detection_balanced_accuracy.to_dict() == {
        name: score for name, (*_, score) in CASES.items()
    }
    assert metrics_of(out)["detection_balanced_accuracy"] == pytest.approx((1.0 + 0.0 + 0.625 + 0.5) / 4)


def test_detection_positives_are_never_what_the_labeller_was_shown():
    """A quantile sample at a shown top token, or inside a shown window, or with a shown window's text (a
    repeated line elsewhere) is left out of the detection positives; one outside every shown window of its
    document, or at the same positions of another document, is kept."""
    from lorascope.autointerp.stage import unseen_positives

    def row(kind: str, doc: int, position: int, tokens: list[str], window_start: int) -> dict:
        return {"kind": kind, "doc_index": doc, "position": position, "window_start": window_start,
                "tokens": tokens, "window_acts": [1.0] * len(tokens), "sign": 1}  # fmt: skip

    top = pd.DataFrame([row("top", 0, 12, list("abcdefghij"), 8), row("top", 3, 40, list("klmnopqrst"), 36)])
    # shown (before=2, after=1): doc 0 positions 10..13 ("cdef"), doc 3 positions 38..41 ("mnop")
    quantile = pd.DataFrame(
        [
            row("quantile", 0, 12, list("abcdefghij"), 8),  # the shown top token itself
            row("quantile", 0, 10, list("xyzabcdefg"), 5),  # inside the shown window of doc 0
            row("quantile", 0, 14, list("uvwxyz1234"), 10),  # just after it: kept
            row("quantile", 5, 12, list("uvqrst5678"), 8),  # doc 0's positions in another document: kept
            row("quantile", 7, 4, list("QRcdefSTUV"), 0),  # another document, the text of a shown window
        ]
    )
    kept, left_out = unseen_positives(quantile, top, 2, 1)
    assert kept == ["wxyz", "qrst"] and left_out == 3
    kept, left_out = unseen_positives(quantile, top.iloc[:0], 2, 1)
    assert len(kept) == 5 and left_out == 0  # nothing shown: nothing to leave out


def test_no_scored_snippet_is_one_the_labeller_saw(ws: Path):
    """On real contexts: every detection positive of every feature is a quantile sample whose token lies
    outside all the windows the explanation prompt showed, and no positive's text is a shown window's."""
    params = tiny_params(autointerp={"n_contexts": 4, "window_before": 3, "window_after": 1})
    features, _ = load_features(params, "lora")
    table = pd.read_parquet(ws / "data/contexts/lora.parquet")
    left_out = 0
    for f in features:
        rows = table[(table.feature == f.id) & (table.sign == f.sign)]
        top = rows[rows.kind == "top"].sort_values("rank").head(4)
        shown = []
        for r in top.itertuples():
            at = r.position - r.window_start
            lo, hi = max(0, at - 3), at + 2
            shown.append((r.doc_index, r.window_start + lo, r.window_start + hi, "".join(r.tokens[lo:hi])))
        texts = {t for *_, t in shown}
        unseen = set()
        for r in rows[rows.kind == "quantile"].itertuples():
            at = r.position - r.window_start
            text = "".join(r.tokens[max(0, at - 3) : at + 2])
            if text not in texts and not any(
                d == r.doc_index and lo <= r.position < hi for d, lo, hi, _ in shown
            ):
                unseen.add(text)
        assert set(f.positives) <= unseen, f.name  # empty when every quantile sample was shown
        assert not set(f.positives) & texts
        left_out += f.positives_left_out
    assert left_out > 0  # the sample did overlap what was shown: the rule is exercised on real data


def test_quality_metrics_by_hand():
    """Per class its share of the labelled features and their mean detection score; the mean over every
    scored feature; failed labels and unscored ones count in neither."""
    rows = [
        {"status": "ok", "classification": 0, "detection_balanced_accuracy": 1.0},
        {"status": "ok", "classification": 0, "detection_balanced_accuracy": 0.5},
        {"status": "ok", "classification": 1, "detection_balanced_accuracy": None},
        {"status": "ok", "classification": 2, "detection_balanced_accuracy": 0.25},
        {"status": "failed", "classification": None, "detection_balanced_accuracy": None},
    ]
    assert stage._quality_metrics(rows) == {
        "class_0_share": 0.5, "class_1_share": 0.25, "class_2_share": 0.25,
        "detection_class_0": 0.75, "detection_class_2": 0.25,
        "detection_balanced_accuracy": (1.0 + 0.5 + 0.25) / 3,
    }  # fmt: skip
    assert stage._quality_metrics(rows[-1:]) == {
        "class_0_share": 0.0,
        "class_1_share": 0.0,
        "class_2_share": 0.0,
    }


def test_run_tags_say_who_labelled_with_which_prompts():
    from lorascope.labelling.prompts import prompt_hash

    heuristic = stage._run_tags(tiny_params().autointerp, "sae", "h1")
    assert heuristic == {
        "autointerp.source": "sae", "autointerp.backend": "heuristic", "autointerp.model": "heuristic-baseline",
        "autointerp.prompt_hash": "h1", "autointerp.detect_prompt_hash": prompt_hash("detect"),
        "autointerp.note": "heuristic baseline: labels from token statistics, not an LLM",
    }  # fmt: skip
    for structured in (True, False):
        cfg = tiny_params(
            autointerp={
                "backend": "openai",
                "model": "gpt-x",
                "api_key_env": "K",
                "structured_output": structured,
            }
        ).autointerp
        tags = stage._run_tags(cfg, "lora", "h2")
        assert "autointerp.note" not in tags and tags["autointerp.model"] == "gpt-x"
        assert tags["autointerp.structured_output"] == str(structured).lower()


def test_the_label_table_is_sorted_and_typed():
    """Rows by feature, the positive sign first; every row stamped with the backend, model and prompt hash;
    integer and float columns with their own Arrow types."""
    import pyarrow as pa

    def row(feature: int, sign: int) -> dict:
        return {
            "source": "lora", "feature": feature, "feature_name": f"f{feature}{'+' if sign > 0 else '-'}",
            "sign": sign, "layer": 0, "component": "q_proj", "explanation": "e", "classification": 1,
            "class_reasoning": "r", "status": "ok", "error": None, "raw_response": "{}", "cached": False,
            "detection_balanced_accuracy": 0.5, "detection_n": 8, "truncated": 0, "input_tokens": 3,
            "output_tokens": 4, "cost_usd": None,
        }  # fmt: skip

    table = stage._table([row(1, -1), row(0, -1), row(1, 1), row(0, 1)], "openai", "gpt-x", "h")
    assert table.column_names == list(LABEL_COLUMNS)
    assert [(r["feature"], r["sign"]) for r in table.to_pylist()] == [(0, 1), (0, -1), (1, 1), (1, -1)]
    assert {(r["backend"], r["model"], r["prompt_hash"]) for r in table.to_pylist()} == {
        ("openai", "gpt-x", "h")
    }
    types = {f.name: f.type for f in table.schema}
    assert (types["feature"], types["sign"], types["layer"], types["classification"]) == (
        pa.int32(), pa.int8(), pa.int32(), pa.int8()
    )  # fmt: skip
    assert (types["input_tokens"], types["output_tokens"], types["detection_n"]) == (
        pa.int64(),
        pa.int64(),
        pa.int32(),
    )
    assert (types["cost_usd"], types["detection_balanced_accuracy"], types["cached"]) == (
        pa.float64(), pa.float64(), pa.bool_()
    )  # fmt: skip
    assert types["explanation"] == pa.string()


def test_a_feature_whose_labelling_raises_is_recorded_as_failed(ws: Path, monkeypatch: pytest.MonkeyPatch):
    """An unexpected exception while labelling one feature (not an LLM error: a bug, a crash) fails that
    feature's row with the error, the others are labelled, and nothing is dropped."""
    import asyncio

    from lorascope.labelling import heuristic
    from lorascope.labelling.prompts import explain_prompt
    from lorascope.labelling.session import open_client

    params = tiny_params(autointerp={"max_features": 3})
    features, _ = load_features(params, "lora")
    victim = features[1]
    answer = heuristic._answer

    victim_prompt = explain_prompt(victim.top, victim.max_act)

    def crash_on_victim(prompt: str) -> str:
        if prompt == victim_prompt:
            raise RuntimeError("boom")
        return answer(prompt)

    monkeypatch.setattr(heuristic, "_answer", crash_on_victim)
    rows = asyncio.run(stage._label_all(params, "lora", features, open_client(params.autointerp)))
    assert [r["feature_name"] for r in rows[:2]] == [features[0].name, features[2].name]
    assert all(r["status"] == "ok" for r in rows[:2])
    layer, component = layer_component(victim.name)
    assert rows[2] == {
        "source": "lora", "feature": victim.id, "feature_name": victim.name, "sign": victim.sign, "layer": layer,
        "component": component, "explanation": None, "classification": None, "class_reasoning": None,
        "status": "failed", "error": "RuntimeError: boom", "raw_response": "", "cached": False,
        "detection_balanced_accuracy": None, "detection_n": 0, "input_tokens": 0, "output_tokens": 0,
        "cost_usd": None,
    }  # fmt: skip
    assert set(rows[2]) | {"truncated"} == set(
        rows[0]
    )  # the table's columns, less the ok rows' truncation count


def test_latent_counts_come_from_the_features_tables_metadata(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lorascope.contexts.tables import LATENTS_KEY

    table = pa.table({"feature": [0, 1]})
    pq.write_table(table.replace_schema_metadata({LATENTS_KEY: b'{"d_sae": 8, "alive": 6, "dead": 2}'}),
                   tmp_path / "sae.parquet")  # fmt: skip
    assert stage.latent_counts(tmp_path / "sae.parquet") == {
        "sae_latents": 8, "sae_live_latents": 6, "sae_dead_latents": 2
    }  # fmt: skip
    pq.write_table(table.replace_schema_metadata({b"other": b"1"}), tmp_path / "lora.parquet")
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "bare.parquet")
    assert (
        stage.latent_counts(tmp_path / "lora.parquet") == stage.latent_counts(tmp_path / "bare.parquet") == {}
    )
