"""The sweep command: trials as nested MLflow runs, parallel processes on one journal study, pruning,
the best params fed back into a run, space errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from lorascope import tracking
from lorascope.errors import LorascopeError
from lorascope.sweep.space import Space, load_space
from lorascope.sweep.study import optimize

from conftest import REPO, cli, run_of, tiny_params

FAST = {
    "finetune": {
        "max_steps": 3,
        "epochs": 1,
        "checkpoint_steps": 3,
        "global_batch_size": 4,
        "micro_batch_size": 2,
    }
}


def space(**over) -> Space:
    spec = {
        "target": "lora",
        "objectives": ["heldout_loss"],
        "n_trials": 4,
        "seed": 0,
        "fixed": FAST,
        "pruner": {"type": "none"},
        "params": {
            "finetune.lora.r": {"choices": [1, 2, 4]},
            "finetune.lr": {"low": 1e-4, "high": 1e-2, "log": True},
        },
        **over,
    }
    return Space.model_validate(spec)


def child_runs(study: str) -> list:
    c = tracking.client()
    exp = c.get_experiment_by_name("lorascope-finetune")
    return c.search_runs([exp.experiment_id], f"tags.`sweep.study` = '{study}' and tags.`sweep.trial` != ''")


def test_four_trials_are_four_child_runs_under_one_parent(with_prepared: Path):
    study = optimize("four", space(), tiny_params(), f"sqlite:///{with_prepared}/optuna.db")
    trials = study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    runs = {r.data.tags["sweep.trial"]: r for r in child_runs("four")}
    assert sorted(runs) == ["0", "1", "2", "3"]
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs.values()}
    assert parents == {study.user_attrs["mlflow_parent_run_id"]}
    parent = tracking.client().get_run(parents.pop())
    assert parent.info.run_name == "sweep:four" and parent.data.metrics["trials_complete"] == 4
    for t in trials:
        run = runs[str(t.number)]
        assert run.data.params["lora.r"] == str(t.params["finetune.lora.r"])
        assert float(run.data.params["lr"]) == pytest.approx(t.params["finetune.lr"])
        assert run.data.params["max_steps"] == "3"  # the fixed overrides reached the stage
        assert run.data.metrics["objective.heldout_loss"] == pytest.approx(t.value)
        assert run.data.tags["sweep.state"] == "complete"
        # the trial's data is a split of the workspace's: linked to the run that prepared it
        assert run.data.tags["upstream.prepare"] == run_of(with_prepared, "data/prepared")
        assert 3 < t.value < 10  # a cross-entropy over a 2048-token vocabulary
    assert not (with_prepared / "sweeps" / "four").exists()  # trial workspaces are cleaned up
    assert not (with_prepared / "models" / "lora").exists()  # the DVC output was never touched


def test_two_processes_share_one_journal_study(with_prepared: Path, tmp_path: Path):
    (with_prepared / "params.yaml").write_text((REPO / "params.yaml").read_text())
    spec = tmp_path / "space.yaml"
    spec.write_text(yaml.safe_dump(space(n_trials=4).model_dump(mode="json")))
    journal = f"journal:{tmp_path / 'journal.log'}"
    exe = Path(sys.executable).parent / "lorascope"
    args = [str(exe), "sweep", "lora", "--study", "shared", "--storage", journal, "--space", str(spec)]
    env = {**os.environ, "LORASCOPE_ROOT": str(with_prepared)}
    procs = [subprocess.Popen(args, cwd=with_prepared, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    from lorascope.sweep.study import storage

    study = optuna.load_study(study_name="shared", storage=storage(journal))
    numbers = sorted(t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert numbers == [0, 1, 2, 3]  # nothing lost, nothing duplicated, the cap held across processes
    assert sorted(r.data.tags["sweep.trial"] for r in child_runs("shared")) == ["0", "1", "2", "3"]
    assert len({r.data.tags["mlflow.parentRunId"] for r in child_runs("shared")}) == 1


def test_the_pruner_stops_a_hopeless_trial(with_prepared: Path):
    """Two good trials, then one whose learning rate cannot move the loss: pruned at its first report."""
    url = f"sqlite:///{with_prepared}/optuna.db"
    spec = space(
        n_trials=3,
        fixed={
            "finetune": {"epochs": 2, "global_batch_size": 4, "micro_batch_size": 4, "checkpoint_steps": 100}
        },
        params={"finetune.lr": {"low": 1e-9, "high": 1e-2, "log": True}},
        pruner={"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
    )
    from lorascope.sweep.study import open_study

    pre = open_study("prune", spec, url)
    for lr in (1e-2, 8e-3, 1e-9):
        pre.enqueue_trial({"finetune.lr": lr})
    study = optimize("prune", spec, tiny_params(), url)
    states = [t.state for t in sorted(study.trials, key=lambda t: t.number)]
    P = optuna.trial.TrialState
    assert states == [P.COMPLETE, P.COMPLETE, P.PRUNED]
    assert list(study.trials[2].intermediate_values) == [1]  # pruned after its first epoch
    runs = {r.data.tags["sweep.trial"]: r for r in child_runs("prune")}
    assert runs["2"].data.tags["sweep.state"] == "pruned" and runs["2"].info.status == "KILLED"


def test_failed_trial_is_recorded_and_the_study_goes_on(with_prepared: Path):
    spec = space(n_trials=2, params={"finetune.lora.r": {"choices": [1]}, "finetune.lr": {"choices": [1e-3]}})
    spec.fixed = {
        **FAST,
        "finetune": {**FAST["finetune"], "lora": {"target_modules": ["q_proj", "nope_proj"]}},
    }
    study = optimize("fails", spec, tiny_params(), f"sqlite:///{with_prepared}/optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert "the model has no nope_proj" in study.trials[0].user_attrs["error"]
    [run, _] = child_runs("fails")
    assert run.data.tags["sweep.state"] == "failed" and "nope_proj" in run.data.tags["sweep.error"]


def test_best_params_feed_back_into_a_run(with_prepared: Path):
    (with_prepared / "params.yaml").write_text((REPO / "params.yaml").read_text())
    url = f"sqlite:///{with_prepared}/optuna.db"
    study = optimize("feed", space(n_trials=2), tiny_params(), url)
    best = study.best_trial
    res = cli("sweep", "best", "--study", "feed", "--storage", url, cwd=with_prepared)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"best trial {best.number}: objective [{best.value}]"
    s_args = (
        f"-S finetune.lora.r={best.params['finetune.lora.r']} -S finetune.lr={best.params['finetune.lr']}"
    )
    assert f"dvc exp run {s_args}" in lines
    out = with_prepared / "sweeps" / "feed.params.yaml"
    from lorascope.config import load_params
    from lorascope.finetune.stage import run

    params = load_params(out)
    assert (
        params.finetune.lr == best.params["finetune.lr"]
        and params.finetune.lora.r == best.params["finetune.lora.r"]
    )
    # the workspace's params, not the sweep's shortcuts
    assert params.finetune.epochs == load_params(with_prepared / "params.yaml").finetune.epochs
    run(load_params(out).model_copy(update={}), "lora")
    logged = tracking.client().get_run(run_of(with_prepared, "models/lora")).data.params
    assert float(logged["lr"]) == pytest.approx(best.params["finetune.lr"])


def test_space_errors(tmp_path: Path):
    base = tiny_params()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"target": "lora", "objectives": ["fvu"], "params": {}}))
    with pytest.raises(LorascopeError, match=r"objectives must be a non-empty subset of \['heldout_loss'\]"):
        load_space(bad, base)
    bad.write_text(
        yaml.safe_dump(
            {"target": "lora", "objectives": ["heldout_loss"], "params": {"finetune.lrr": {"choices": [1]}}}
        )
    )
    with pytest.raises(LorascopeError, match=r"params.finetune.lrr: finetune.lrr: unknown key"):
        load_space(bad, base)
    bad.write_text(
        yaml.safe_dump(
            {
                "target": "lora",
                "objectives": ["heldout_loss"],
                "params": {"finetune.lr": {"low": 1, "high": 0.1}},
            }
        )
    )
    with pytest.raises(LorascopeError, match=r"params.finetune.lr: low \(1.0\) must be < high \(0.1\)"):
        load_space(bad, base)
    for name in ("lora", "sae"):  # the shipped spaces are valid
        assert load_space(REPO / "pipelines" / "sweeps" / f"{name}.yaml", base).target == name


# ------------------------------------------------------------------------ trial isolation, parent run
def test_trial_workspaces_are_per_thread_and_leave_the_environment_alone(workspace: Path, tmp_path: Path):
    """Two trial contexts open at once in two threads: each sees its own workspace root, both the real
    store and the explicit tracking URI; the main thread and ``os.environ`` see nothing of it."""
    import threading

    from lorascope.project import store_root, workspace_root
    from lorascope.sweep.trial import trial_workspace

    (workspace / "models" / "base").mkdir(parents=True)
    environ = dict(os.environ)
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    both_inside = threading.Barrier(2, timeout=30)
    seen: dict[int, tuple] = {}

    def trial(n: int) -> None:
        with trial_workspace(workspace, "iso", n, ("models/base",), store=workspace, tracking_uri=uri) as ws:
            both_inside.wait()
            seen[n] = (ws, workspace_root(), store_root(), tracking.tracking_uri(), dict(os.environ))
            (workspace_root() / "models" / "mine.txt").write_text(str(n))
            both_inside.wait()
            assert (ws / "models" / "mine.txt").read_text() == str(n)

    threads = [threading.Thread(target=trial, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in (0, 1):
        ws, root, store, seen_uri, env = seen[n]
        assert ws == workspace / "sweeps" / "iso" / f"trial-{n}" and root == ws
        assert store == workspace and seen_uri == uri and env == environ
    assert workspace_root() == workspace and tracking.tracking_uri() != uri and dict(os.environ) == environ
    assert not (workspace / "sweeps" / "iso").exists()


def test_parallel_trials_nest_under_one_parent_in_their_own_workspaces(
    with_base: Path, monkeypatch: pytest.MonkeyPatch
):
    """``n_jobs=2``: trials run two at a time in threads, each stage run in its own workspace and nested
    under the study's one parent run (MLflow's nested runs); ``os.environ`` is never touched."""
    import threading

    from lorascope.project import workspace_root
    from lorascope.sweep import trial as trial_module

    together = threading.Barrier(2, timeout=60)
    roots: dict[int, Path] = {}
    environ = dict(os.environ)

    def fake_lora(trial, params, space, root, ws):  # noqa: ANN001, ANN202
        together.wait()  # two trials are inside their workspaces at once
        assert workspace_root() == ws and root == with_base and dict(os.environ) == environ
        with tracking.stage_run("finetune", params, run_name=f"fake-{trial.number}"):
            (ws / "models" / "lora").mkdir(parents=True)
            roots[trial.number] = workspace_root()
        together.wait()
        return [float(trial.number)]

    monkeypatch.setattr(trial_module, "run_lora", fake_lora)
    study = optimize(
        "parallel", space(), tiny_params(), f"sqlite:///{with_base}/optuna.db", n_trials=4, n_jobs=2
    )
    assert sorted(t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE) == [
        0,
        1,
        2,
        3,
    ]
    assert roots == {n: with_base / "sweeps" / "parallel" / f"trial-{n}" for n in range(4)}
    runs = child_runs("parallel")
    assert sorted(r.info.run_name for r in runs) == [f"fake-{n}" for n in range(4)]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {study.user_attrs["mlflow_parent_run_id"]}
    assert dict(os.environ) == environ and not (with_base / "models" / "lora").exists()


def test_processes_racing_to_create_a_study_share_one_parent(workspace: Path):
    """Whoever's ``create_study`` wins keeps its parent run; the other deletes its own and joins: one
    parent, no sleep, no last-write-wins."""
    import threading

    from lorascope.sweep.study import open_study, parent_run, storage

    url = f"sqlite:///{workspace}/optuna.db"
    storage(url), tracking.experiment_id("finetune")  # the empty stores, made once (not what is raced)
    start = threading.Barrier(4, timeout=30)
    parents: list[str] = []

    def join() -> None:
        start.wait()
        parents.append(parent_run(open_study("race", space(), url)))

    threads = [threading.Thread(target=join) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c = tracking.client()
    exp = c.get_experiment_by_name("lorascope-finetune")
    alive = c.search_runs([exp.experiment_id], "tags.`sweep.study` = 'race'")
    assert len(parents) == 4 and len(set(parents)) == 1 and [r.info.run_id for r in alive] == parents[:1]


def test_a_study_made_elsewhere_has_no_parent_to_guess(workspace: Path, monkeypatch: pytest.MonkeyPatch):
    from lorascope.sweep import study as study_module

    monkeypatch.setattr(study_module, "PARENT_WAIT_S", 0.1)
    url = f"sqlite:///{workspace}/optuna.db"
    optuna.create_study(study_name="foreign", storage=url)
    with pytest.raises(LorascopeError, match=r"study 'foreign' has no MLflow parent run .* not created by"):
        study_module.parent_run(study_module.open_study("foreign", space(), url))
