"""Lineage tags, links by output digest, the store location, and a real `mlflow server`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from lorascope import resume, tracking
from lorascope.config import Params, section_hash
from lorascope.project import store_root, workspace_root

from tests.conftest import Prepared, cli, free_port, make_workspace, record_output, run_of, serve, tiny_params
from tests.test_resume import inputs as make_inputs


def test_prepare_run_carries_the_lineage_tags(prepared: Prepared):
    run = tracking.client().get_run(prepared.prepare_run)
    tags = run.data.tags
    assert tags["lorascope.stage"] == "prepare"
    assert tags["git.commit"] == prepared.commit and tags["mlflow.source.git.commit"] == prepared.commit
    assert tags["git.dirty"] == "false"  # outputs are untracked files, not modifications
    assert tags["params.hash"] == section_hash(tiny_params(), "prepare")
    assert tags["dvc.md5.models/base"] == tracking.dvc_md5(prepared.root / "models" / "base")
    assert tags["dvc.md5.models/base"].endswith(".dir")
    assert tags["upstream.base"] == prepared.base_run
    assert run.data.params["block_size"] == "512" and run.data.params["synthetic.n_train"] == "64"
    assert tracking.client().get_experiment(run.info.experiment_id).name == "lorascope-prepare"
    [dataset] = run.inputs.dataset_inputs  # the runs table's Dataset column
    assert dataset.dataset.source_type == "code" and dataset.dataset.digest
    assert (
        dataset.dataset.name == "synthetic" and json.loads(dataset.dataset.source)["tags"]["n_train"] == "64"
    )
    assert [t.value for t in dataset.tags if t.key == "mlflow.data.context"] == ["training"]
    artifacts = {a.path for a in tracking.client().list_artifacts(prepared.prepare_run)}
    assert {"validation.json", "params.yaml"} <= artifacts


def test_a_second_stage_links_upstream_prepare_and_lineage_walks_back(
    prepared: Prepared, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("LORASCOPE_ROOT", str(prepared.root))
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"\x00" * 16)
    with tracking.stage_run("finetune", tiny_params(), inputs=[prepared.root / "data" / "prepared"]) as run:
        outputs = run.log_outputs(out / "weights.bin")
    assert run.upstream == {"prepare": prepared.prepare_run}
    weights = (out / "weights.bin").resolve().as_posix()  # outside the workspace: named by its absolute path
    assert outputs == {weights: "4ae71336e44bf9bf79d2752e234818a5"}  # md5 of 16 zero bytes
    assert sorted(p.name for p in out.iterdir()) == ["weights.bin"]  # nothing written beside the output
    tags = tracking.client().get_run(run.run_id).data.tags
    assert tags["upstream.prepare"] == prepared.prepare_run
    assert tags[f"dvc.out.{weights}"] == "4ae71336e44bf9bf79d2752e234818a5"

    chain = tracking.lineage(run.run_id)
    assert chain["stage"] == "finetune"
    [prep] = chain["upstream"]
    assert prep["run_id"] == prepared.prepare_run and prep["datasets"][0]["name"] == "synthetic"
    [base] = prep["upstream"]
    assert base["run_id"] == prepared.base_run and base["upstream"] == []

    res = cli("lineage", run.run_id)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"finetune  run {run.run_id}  [FINISHED]")
    assert any(line.startswith(f"<-  prepare  run {prepared.prepare_run}") for line in lines)
    assert any(line.strip().startswith(f"<-  base  run {prepared.base_run}") for line in lines)
    assert any("dataset synthetic" in line for line in lines)
    as_json = json.loads(cli("lineage", run.run_id, "--json").stdout)
    assert as_json["upstream"][0]["upstream"][0]["stage"] == "base"


def test_log_outputs_tags_each_output_with_its_dvc_md5(workspace: Path):
    model = workspace / "models" / "x"
    model.mkdir(parents=True)
    (model / "weights.bin").write_bytes(b"\x00" * 16)
    metrics = workspace / "metrics" / "x.json"
    metrics.parent.mkdir()
    metrics.write_text('{"loss": 1.5}\n')
    with tracking.stage_run("finetune", tiny_params()) as run:
        logged = run.log_outputs(model, metrics)
    assert logged == {"models/x": tracking.dvc_md5(model), "metrics/x.json": tracking.dvc_md5(metrics)}
    assert logged["models/x"].endswith(".dir")
    assert logged["metrics/x.json"] == hashlib.md5(metrics.read_bytes()).hexdigest()
    tags = tracking.client().get_run(run.run_id).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("dvc.out.")} == {
        "dvc.out.models/x": logged["models/x"],
        "dvc.out.metrics/x.json": logged["metrics/x.json"],
    }
    made_by = {"run_id": run.run_id, "stage": "finetune"}
    assert tracking.producer(model) == tracking.producer(metrics) == made_by


def test_producer_is_the_latest_run_that_logged_this_content(workspace: Path):
    out = workspace / "data" / "thing.json"
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps({"made_in": str(workspace)}))
    first_md5 = tracking.dvc_md5(out)
    record_output("prepare", workspace, "data/thing.json")
    time.sleep(0.02)  # runs are ordered by start time (milliseconds)
    latest = record_output("prepare", workspace, "data/thing.json")
    assert tracking.producer(out) == {"run_id": latest, "stage": "prepare"}

    out.write_text(json.dumps({"made_in": str(workspace), "edited": True}))  # content no run logged
    assert tracking.producer(out) is None
    assert tracking.producer(out, md5=first_md5) == {"run_id": latest, "stage": "prepare"}

    twin = workspace / "data" / "twin.json"  # equal content under another path: not its output
    twin.write_text(json.dumps({"made_in": str(workspace)}))
    assert tracking.dvc_md5(twin) == first_md5
    assert tracking.producer(twin) is None
    assert tracking.producer(twin, name="data/thing.json") == {"run_id": latest, "stage": "prepare"}


def test_stage_run_links_the_producer_of_a_copied_output(workspace: Path, tmp_path: Path, monkeypatch):
    elsewhere = make_workspace(tmp_path / "elsewhere")
    (elsewhere / "data" / "contexts").mkdir(parents=True)
    for source in ("lora", "mlp"):
        (elsewhere / "data" / "contexts" / f"{source}.parquet").write_text(f"{source} rows of {tmp_path}")
    monkeypatch.setenv("LORASCOPE_ROOT", str(elsewhere))
    made = {}
    for source in ("lora", "mlp"):  # one run per source
        with tracking.stage_run("contexts", tiny_params()) as run:
            run.log_outputs(elsewhere / "data" / "contexts" / f"{source}.parquet")
        made[source] = run.run_id

    # the same relative paths with the same content in another workspace (a dvc pull, a copy)
    shutil.copytree(elsewhere / "data", workspace / "data")
    shutil.copy(workspace / "data/contexts/lora.parquet", workspace / "data/lora-copy.parquet")
    monkeypatch.setenv("LORASCOPE_ROOT", str(workspace))
    inputs = [workspace / "data/contexts/lora.parquet", workspace / "data/contexts/mlp.parquet"]
    with tracking.stage_run(
        "autointerp", tiny_params(), inputs=[*inputs, workspace / "data/lora-copy.parquet"]
    ) as run:
        pass
    assert run.upstream == {"contexts": made["lora"], "contexts.mlp": made["mlp"]}
    tags = tracking.client().get_run(run.run_id).data.tags
    assert tags["upstream.contexts"] == made["lora"] and tags["upstream.contexts.mlp"] == made["mlp"]
    assert {k for k in tags if k.startswith("upstream.")} == {"upstream.contexts", "upstream.contexts.mlp"}
    assert tags["dvc.md5.data/lora-copy.parquet"] == tags["dvc.md5.data/contexts/lora.parquet"]


def test_lineage_of_an_output_path(prepared: Prepared, with_prepared: Path):
    res = cli("lineage", "data/prepared", cwd=with_prepared)  # a copy of the session's prepared data
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"prepare  run {prepared.prepare_run}  [FINISHED]")
    assert any(line.strip().startswith(f"<-  base  run {prepared.base_run}") for line in lines)
    as_json = json.loads(cli("lineage", str(with_prepared / "models" / "base"), "--json").stdout)
    # the base is deterministic: any test's base run may be the latest to have logged these bytes
    logged = tracking.client().get_run(as_json["run_id"]).data.tags["dvc.out.models/base"]
    assert logged == tracking.dvc_md5(with_prepared / "models" / "base") and as_json["stage"] == "base"

    (with_prepared / "notes.txt").write_text(f"written by hand in {with_prepared}\n")
    for target in ("notes.txt", "data/prepared/train.parquet"):  # no run logged it as an output
        res = cli("lineage", target, cwd=with_prepared)
        assert res.returncode == 2 and res.stdout == ""
        assert res.stderr == (
            f"error: {target}: no run in {os.environ['MLFLOW_TRACKING_URI']} logged this content as an output\n"
        )


def test_unknown_run_is_one_line():
    res = cli("lineage", "0123456789abcdef")
    assert res.returncode == 2
    assert (
        res.stderr.startswith("error: run '0123456789abcdef' not found in sqlite:///")
        and res.stderr.count("\n") == 1
    )


def test_failed_body_marks_the_run_failed(prepared: Prepared, monkeypatch):
    monkeypatch.setenv("LORASCOPE_ROOT", str(prepared.root))
    with pytest.raises(RuntimeError), tracking.stage_run("finetune", tiny_params()) as run:
        raise RuntimeError("boom")
    assert tracking.client().get_run(run.run_id).info.status == "FAILED"


def test_default_store_is_absolute_at_the_repo_root(tmp_path: Path, monkeypatch):
    repo = make_workspace(tmp_path / "repo")
    exp_ws = make_workspace(repo / ".dvc" / "tmp" / "exps" / "tmpab12cd")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("LORASCOPE_ROOT", raising=False)
    monkeypatch.chdir(exp_ws)
    assert workspace_root() == exp_ws.resolve()
    assert store_root() == repo.resolve()
    assert tracking.tracking_uri() == f"sqlite:///{repo.resolve()}/mlflow.db"
    assert tracking.artifact_root() == repo.resolve() / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri() == "http://127.0.0.1:5999" and tracking.artifact_root() is None


def test_ui_command_points_at_the_store(tmp_path: Path):
    res = cli("ui", "--dry-run", "--port", "5123")
    assert res.returncode == 0, res.stderr
    uri = os.environ["MLFLOW_TRACKING_URI"]
    assert f"ui --backend-store-uri {uri} --default-artifact-root file://" in res.stdout
    assert res.stdout.rstrip().endswith("--host 127.0.0.1 --port 5123")
    fresh = tmp_path / "fresh.db"  # printing the links creates no store (mlflow ui will)
    res = cli("ui", "--dry-run", env={"MLFLOW_TRACKING_URI": f"sqlite:///{fresh}"})
    assert res.returncode == 0 and not fresh.exists(), res.stderr
    assert res.stdout.startswith(
        "experiments: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning\n"
    )


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = free_port()
    exe = Path(sys.executable).parent / "mlflow"
    proc = serve(
        [
            str(exe), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "server-artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        port, tmp_path / "server.log",
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_stage_logs_to_a_real_mlflow_server(mlflow_server: str, with_base: Path, monkeypatch, tmp_path: Path):
    from lorascope.prepare.stage import run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    base_run = record_output("base", with_base, "models/base")  # the base model's record in this store
    run(tiny_params(prepare={"synthetic": {"n_train": 8}}))
    run_id = run_of(with_base, "data/prepared")  # found through the server

    import mlflow

    c = mlflow.MlflowClient(tracking_uri=mlflow_server)
    remote = c.get_run(run_id)
    assert remote.data.tags["lorascope.stage"] == "prepare"
    assert remote.data.tags["upstream.base"] == base_run
    assert remote.data.tags["dvc.out.data/prepared"] == tracking.dvc_md5(with_base / "data/prepared")
    assert remote.data.metrics["rows"] == 8
    got = Path(c.download_artifacts(run_id, "validation.json", str(tmp_path)))
    assert json.loads(got.read_text()) == json.loads(
        (with_base / "data/prepared/validation.json").read_text()
    )
    shutil.rmtree(tmp_path / "server-artifacts", ignore_errors=True)


def _claim(params: Params, inputs: list[Path], work: Path, **extra: str) -> bool:
    with tracking.stage_run("ablate", params, inputs) as run:
        return run.claim(work, **extra)


def test_the_fingerprint_is_the_runs_own_params_hash_and_input_md5s(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
):
    inputs = make_inputs(workspace)
    hashed: list[Path] = []
    dvc_md5 = tracking.dvc_md5
    monkeypatch.setattr(tracking, "dvc_md5", lambda p: hashed.append(Path(p)) or dvc_md5(p))
    with tracking.stage_run("ablate", tiny_params(), inputs) as run:
        opened = len(hashed)
        fp = run.fingerprint(source="lora")
        run.claim(workspace / "checkpoints" / "ablate", source="lora")
    assert len(hashed) == opened == len(inputs)  # hashed once, when the run opened
    tags = tracking.client().get_run(run.run_id).data.tags
    assert fp == {
        "params_hash": tags["params.hash"],
        "inputs": {"data/in.txt": tags["dvc.md5.data/in.txt"], "models/m": tags["dvc.md5.models/m"]},
        "source": "lora",
    }
    assert fp["params_hash"] == section_hash(tiny_params(), "ablate")
    assert resume.matches(workspace / "checkpoints" / "ablate", fp)
    assert run.run_id not in str(fp) and str(workspace) not in str(fp)


def test_same_params_and_inputs_resume_and_others_start_over(workspace: Path):
    inputs = make_inputs(workspace)
    work = workspace / "checkpoints" / "ablate"
    assert not _claim(tiny_params(), inputs, work)  # nothing to resume
    work.mkdir()
    (work / "00000.json").write_text("{}")
    assert _claim(tiny_params(), inputs, work) and (work / "00000.json").is_file()  # a new run: resumed
    assert _claim(tiny_params(sae={"k": 7}), inputs, work)  # another section's params: still resumed

    assert not _claim(tiny_params(ablate={"sequences": 2}), inputs, work)  # other params: started over
    assert not work.exists()
    work.mkdir()
    (work / "00000.json").write_text("{}")
    inputs[0].write_text("other tokens\n")  # another input: started over
    assert not _claim(tiny_params(ablate={"sequences": 2}), inputs, work) and not work.exists()

    work.mkdir()
    assert not _claim(tiny_params(ablate={"sequences": 2}), inputs, work, source="mlp")  # other extras
