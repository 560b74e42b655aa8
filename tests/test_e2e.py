"""End to end: a fresh git + DVC repo, `dvc repro` of the tiny profile, a no-op re-run, an experiment."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.e2e


def sh(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of this repository's files in a new git repository (as a fresh clone would be)."""
    dest = tmp_path_factory.mktemp("clone") / "lorascope"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LORASCOPE_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    sh("git", "init", "-q", cwd=dest, env=env)
    sh("git", "add", "-A", cwd=dest, env=env)
    sh("git", "commit", "-qm", "clone", cwd=dest, env=env)
    return dest, env


def runs(db: Path, stage: str) -> list[tuple[str, dict[str, str]]]:
    with sqlite3.connect(db) as con:
        ids = [r[0] for r in con.execute(
            "SELECT r.run_uuid FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
            "WHERE e.name = ? ORDER BY r.start_time", (f"lorascope-{stage}",))]  # fmt: skip
        return [
            (i, dict(con.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (i,)).fetchall()))
            for i in ids
        ]


def test_dvc_repro_then_noop(repo):
    root, env = repo
    first = sh("dvc", "repro", cwd=root, env=env)
    stages = ("base", "prepare", "finetune@lora", "finetune@full", "extract@lora", "extract@mlp")
    evaluate = ("evaluate@base", "evaluate@lora", "evaluate@full", "recovery")
    interp = ("autointerp@lora", "autointerp@mlp", "autointerp@sae", "categorize")
    ablate = ("ablate", "ablate-export@attn", "ablate-export@mlp", "evaluate@lora-attn-ablated",
              "evaluate@lora-mlp-ablated", "steer", "report")  # fmt: skip
    for stage in (
        *stages,
        *evaluate,
        "sae",
        "contexts@lora",
        "contexts@mlp",
        "contexts@sae",
        *interp,
        *ablate,
    ):
        assert f"Running stage '{stage}'" in first.stdout, stage
    for out in (
        "metrics/eval/lora.json",
        "metrics/eval/lora-mlp-ablated.json",
        "models/lora-attn-ablated/adapter_config.json",
        "metrics/ablation/groups.json",
        "metrics/ablation/figure3.json",
        "data/steer/summary.parquet",
        "metrics/steer.json",
        "reports/index.html",
        "reports/dashboard.html",
        "reports/figure3.png",
        "reports/table2.md",
        "data/interp/sae.parquet",
        "data/interp/categories/figure1.json",
        "metrics/recovery.json",
        "metrics/recovery.md",
        "data/activations/lora/index.json",
        "data/activations/mlp/index.json",
        "data/contexts/lora.parquet",
        "data/contexts/mlp.features.parquet",
        "data/contexts/sae.parquet",
        "models/sae/sae.safetensors",
        "metrics/sae.json",
        "models/lora/adapter_model.safetensors",
        "models/full/model.safetensors",
        "models/base/config.json",
        "data/prepared/train.parquet",
        "data/prepared/run.json",
        "metrics/prepare.json",
    ):
        assert (root / out).is_file(), out
    lock = yaml.safe_load((root / "dvc.lock").read_text())

    second = sh("dvc", "repro", cwd=root, env=env)
    assert "Data and pipelines are up to date." in second.stdout
    assert "Running stage" not in second.stdout
    assert yaml.safe_load((root / "dvc.lock").read_text()) == lock

    # the store is at the repo root, git-ignored, and the run's input md5 is the one DVC recorded
    db = root / "mlflow.db"
    assert db.is_file() and (root / "mlruns").is_dir()
    ignored = sh(
        "git", "check-ignore", "mlflow.db", "mlruns", "models/base", "data/prepared", cwd=root, env=env
    )
    assert ignored.stdout.split() == ["mlflow.db", "mlruns", "models/base", "data/prepared"]
    [(prep_id, tags)] = runs(db, "prepare")
    [base_dep] = [d for d in lock["stages"]["prepare"]["deps"] if d["path"] == "models/base"]
    assert tags["dvc.md5.models/base"] == base_dep["md5"]
    [(base_id, _)] = runs(db, "base")
    assert tags["upstream.base"] == base_id
    assert tags["git.commit"] == sh("git", "rev-parse", "HEAD", cwd=root, env=env).stdout.strip()

    lineage = sh("lorascope", "lineage", prep_id, cwd=root, env=env).stdout
    assert f"<-  base  run {base_id}" in lineage
    lora_run = json.loads((root / "models/lora/run.json").read_text())
    assert lora_run["upstream"] == {"prepare": prep_id, "base": base_id}
    # contexts -> extract -> finetune -> prepare -> base
    contexts_run = json.loads((root / "data/contexts/lora.run.json").read_text())
    extract_run = json.loads((root / "data/activations/lora/run.json").read_text())
    assert contexts_run["upstream"] == {"extract": extract_run["run_id"]}
    assert extract_run["upstream"] == {"prepare": prep_id, "base": base_id, "finetune": lora_run["run_id"]}
    chain = json.loads(sh("lorascope", "lineage", "--json", contexts_run["run_id"], cwd=root, env=env).stdout)
    assert [u["stage"] for u in chain["upstream"][0]["upstream"]] == ["base", "finetune", "prepare"]
    # Table 1 in `dvc metrics show`, its run reaching every evaluated variant
    shown = sh("dvc", "metrics", "show", "--json", cwd=root, env=env).stdout
    table = json.loads(shown)[""]["data"]["metrics/recovery.json"]["data"]["tasks"]
    assert set(table) == {"aime24_nofigures", "math500", "gpqa_diamond"}
    assert {"base", "lora", "full"} <= set(table["math500"])  # dvc leaves out a null recovery:
    assert {"recovery", "recovery.reason"} & set(table["math500"])  # its reason is there instead
    eval_run = json.loads((root / "metrics/eval/lora.run.json").read_text())
    assert eval_run["upstream"]["finetune"] == lora_run["run_id"]
    interp_run = json.loads((root / "data/interp/lora.run.json").read_text())
    assert interp_run["upstream"] == {"contexts": contexts_run["run_id"]}
    recovery_run = json.loads((root / "metrics/recovery.run.json").read_text())
    assert len(recovery_run["upstream"]) == 5 and eval_run["run_id"] in recovery_run["upstream"].values()
    # Table 2: the ablated adapters are evaluated and get their recovery columns
    for group in ("attn", "mlp"):
        assert {f"lora-{group}-ablated", f"recovery.lora-{group}-ablated"} & set(table["math500"])
        export_run = json.loads((root / f"models/lora-{group}-ablated/run.json").read_text())
        ablated_eval = json.loads((root / f"metrics/eval/lora-{group}-ablated.run.json").read_text())
        assert ablated_eval["upstream"]["ablate"] == export_run["run_id"]
        assert export_run["upstream"] == {"finetune": lora_run["run_id"]}
    # the KL sweep in `dvc metrics show`, its run reaching the adapter; steering in its own file
    metrics = json.loads(shown)[""]["data"]
    groups = metrics["metrics/ablation/groups.json"]["data"]
    assert groups["direction"] == "KL(P_lora || P_ablated)" and set(groups["ablations"]) == {
        "attn",
        "mlp",
        "all",
    }
    ablate_run = json.loads((root / "metrics/ablation/run.json").read_text())
    assert (
        ablate_run["run_id"] == groups["run_id"] and ablate_run["upstream"]["finetune"] == lora_run["run_id"]
    )
    steer = metrics["metrics/steer.json"]["data"]["directions"]
    # the report: nothing missing after a full repro; `dvc plots show` finds the loss and KL data
    report = json.loads((root / "reports/run.json").read_text())
    assert report["missing"] == [] and report["lineage"]["metrics/recovery.json"] == recovery_run["run_id"]
    plots = sh("dvc", "plots", "show", "--json", cwd=root, env=env).stdout
    for name in ("loss_lora.csv", "loss_full.csv", "ablation_layers.csv", "ablation_types.csv"):
        assert f"reports/plots/{name}" in plots, name
    assert set(steer) == {"L1.gate_proj", "sae.0"} and set(steer["sae.0"]) == {"0", "10", "50", "100"}


def test_temp_experiment_logs_to_the_same_store(repo):
    root, env = repo
    if not (root / "dvc.lock").is_file():
        sh("dvc", "repro", cwd=root, env=env)
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "lock", "--allow-empty", cwd=root, env=env)
    before = runs(root / "mlflow.db", "prepare")
    sh("dvc", "exp", "run", "--temp", "-S", "prepare.synthetic.n_train=16", cwd=root, env=env)
    after = runs(root / "mlflow.db", "prepare")
    assert len(after) == len(before) + 1
    assert not list((root / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
    with sqlite3.connect(root / "mlflow.db") as con:
        n_train = con.execute(
            "SELECT value FROM params WHERE run_uuid = ? AND key = 'synthetic.n_train'", (after[-1][0],)
        ).fetchone()
    assert n_train == ("16",)
