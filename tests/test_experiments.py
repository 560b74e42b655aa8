"""Each stage's MLflow experiment: kind, description, the key-metrics view, and what `lorascope ui`
opens in a real browser."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from lorascope import experiments, tracking
from lorascope.experiments import EXPERIMENTS, VIEW_TAG, columns, view, view_value
from lorascope.pipeline import STAGES

from tests.conftest import free_port, serve, tiny_params

CHROMIUM = Path("/usr/bin/chromium")


def _opened() -> set[str]:
    """The stage names ``src/`` opens runs under: ``stage_run("<stage>", ...)`` anywhere."""
    found = set()
    for path in (Path(experiments.__file__).parent).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "stage_run":
                assert isinstance(node.args[0], ast.Constant), f"{path}: stage_run's stage is not a literal"
                found.add(node.args[0].value)
    return found


def test_every_stage_has_a_face_with_a_description_and_key_columns():
    stages = {s.name for s in STAGES} - {"recovery", "ablate-export"}  # runs in evaluate's and ablate's
    assert set(EXPERIMENTS) == stages == _opened()
    for stage, exp in EXPERIMENTS.items():
        assert len(exp.description) > 40 and exp.columns, stage
    assert experiments.tags("evaluate") == {
        "mlflow.experimentKind": "custom_model_development",
        "mlflow.note.content": EXPERIMENTS["evaluate"].description,
    }


def test_columns_follow_the_patterns_keep_what_was_shown_and_round_trip():
    logged = {"math500.score": 1, "aime24_nofigures.score": 1, "aime24_nofigures.recovery": 1,
              "aime24_nofigures.recovery.ci_low": 1, "generated_tokens": 1, "math500.n": 1}  # fmt: skip
    first = columns("evaluate", logged, [])
    assert first == [
        "attributes.`Dataset`",
        "metrics.`aime24_nofigures.recovery`",
        "metrics.`aime24_nofigures.score`",
        "metrics.`math500.score`",
    ]
    # a later run's metrics join the view; what earlier runs showed stays; no dataset column for sae
    assert columns("evaluate", {"gpqa_diamond.score": 0}, first) == [
        *first[:3],
        "metrics.`gpqa_diamond.score`",
        first[3],
    ]
    assert columns("sae", {"fvu": 0.1, "dead_latents": 3, "train_mse": 2}, []) == [
        "metrics.`dead_latents`",
        "metrics.`fvu`",
    ]
    envelope = json.loads(view_value(first))
    assert envelope["name"] == "lorascope: key metrics" and envelope["createdAt"] == envelope["updatedAt"]
    assert view(view_value(first)) == first
    assert view(None) == [] and view("not json") == [] and view('{"state": "{}"}') == []


def test_a_stage_run_sets_the_face_and_adds_its_key_metrics_to_the_view(monkeypatch, tmp_path: Path):
    import mlflow

    from lorascope.config import Params

    c = tracking.client()
    stage = "sae"
    exp_id = tracking.experiment_id(stage)
    for key in [*experiments.tags(stage), VIEW_TAG]:  # as an experiment created before the tags was
        if key in c.get_experiment(exp_id).tags:
            c.delete_experiment_tag(exp_id, key)
    params = Params()
    with tracking.stage_run(stage, params):
        mlflow.log_metrics({"fvu": 0.1, "train_mse": 2.0})
    exp = c.get_experiment(exp_id)
    assert {k: exp.tags[k] for k in experiments.tags(stage)} == experiments.tags(stage)
    assert view(exp.tags[VIEW_TAG]) == ["metrics.`fvu`"]
    with pytest.raises(RuntimeError), tracking.stage_run(stage, params):  # a failed run adds nothing
        mlflow.log_metrics({"l0_calibrated": 16.0})
        raise RuntimeError("boom")
    assert view(c.get_experiment(exp_id).tags[VIEW_TAG]) == ["metrics.`fvu`"]
    with tracking.stage_run(stage, params):
        mlflow.log_metrics({"alive_latents": 30.0})
    assert view(c.get_experiment(exp_id).tags[VIEW_TAG]) == ["metrics.`alive_latents`", "metrics.`fvu`"]


# ------------------------------------------------------------------------------------ in a browser
def _landing(printed: str, stage: str) -> str:
    m = re.search(rf"^  {stage} +(http://\S+)$", printed, re.M)
    assert m, printed
    return m[1]


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (CI installs it)")
def test_lorascope_ui_lands_on_the_runs_table_with_the_key_metrics(with_base: Path, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    from lorascope.prepare.stage import run

    run(tiny_params(prepare={"synthetic": {"n_train": 8}}))
    metrics = (
        tracking.client().search_runs([tracking.experiment_id("prepare")], max_results=1)[0].data.metrics
    )
    port = free_port()
    exe = Path(sys.executable).parent / "lorascope"  # the installed script, as a user runs it
    proc = serve([str(exe), "ui", "--port", str(port)], port, tmp_path / "ui.log")
    try:
        printed = (tmp_path / "ui.log").read_text()
        url = _landing(printed, "prepare")
        assert f"experiments: http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning" in printed
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
            page = b.new_page(viewport={"width": 1600, "height": 900})
            page.goto(url)
            metric_cols = page.locator('[role=columnheader][col-id^="metrics."]')
            metric_cols.first.wait_for(timeout=60_000)
            cols = [metric_cols.nth(i).get_attribute("col-id") for i in range(metric_cols.count())]
            cells = {c: page.locator(f"[role=gridcell][col-id='{c}']").all_inner_texts() for c in cols}
            shown = page.inner_text("body")
            b.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert EXPERIMENTS["prepare"].description[:60] in shown  # the description above the table
    key = ["rows", "tokens_mean", "tokens_total", "truncated_fraction"]
    assert cols == [f"metrics.`{k}`" for k in key]  # the key metrics are the table's metric columns
    for name in key:  # each column shows the run's value (among the store's other prepare runs)
        assert any(_value_shown(metrics[name], cell) for cell in cells[f"metrics.`{name}`"]), name
    assert "Dataset" in shown and "Tokens per Trace" not in shown  # not the GenAI overview


def _value_shown(value: Any, cell: str) -> bool:
    """The UI rounds floats; the integer, or any rounding of ``value`` to 1-4 decimals, counts."""
    forms = {str(int(value))} if float(value).is_integer() else {f"{value:.{d}f}" for d in range(1, 5)}
    return cell.strip() in forms
