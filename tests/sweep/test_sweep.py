"""The sweep command: trials as nested MLflow runs, parallel processes on one journal study, pruning,
the best params fed back into a run, space errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml

from lorascope import tracking
from lorascope.errors import LorascopeError
from lorascope.sweep.space import Space, load_space
from lorascope.sweep.study import optimize

from tests.conftest import REPO, cli, run_of, tiny_params

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


# ------------------------------------------------------------------------ objectives, computed another way
class _Bigram(torch.nn.Module):
    """A model whose answer is known: the logits at a position are a row of a fixed table, picked by the
    token there (so padding, the shift and the loss mask all change the result if they are wrong)."""

    def __init__(self, table_VV: torch.Tensor):
        super().__init__()
        self.table_VV = torch.nn.Parameter(table_VV)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table_VV[input_ids])


class _Trial:
    """What a trial function uses of an Optuna trial: the reports it makes, the pruning answer it gets."""

    number = 0

    def __init__(self, prune: bool = False):
        self.reports: list[tuple[int, float]] = []
        self.prune = prune

    def report(self, value: float, step: int) -> None:
        self.reports.append((step, value))

    def should_prune(self) -> bool:
        return self.prune


def test_heldout_loss_is_the_mean_cross_entropy_of_the_trained_tokens():
    """Against the definition, token by token in float64: -log softmax(table[previous token])[token] over
    each row's positions from ``loss_start`` on, averaged over all those tokens (not per row, not per
    batch). Nine rows of different lengths: batches of 4, 4 and 1, right padding with a pad id that is also a
    real token; the model's train/eval mode is given back."""
    from lorascope.sweep.trial import heldout_loss

    V, pad = 7, 0
    g = torch.Generator().manual_seed(5)
    model = _Bigram(torch.randn(V, V, generator=g) * 2)
    rows = [
        {"input_ids": [3, 0, 5, 1, 6, 2, 0, 4, 4], "loss_start": 5},
        {"input_ids": [1, 2, 3], "loss_start": 1},
        {"input_ids": [6, 5, 4, 3, 2, 1], "loss_start": 4},
        {"input_ids": [2, 2, 0, 1], "loss_start": 2},
        {"input_ids": [5, 1, 3, 3, 0, 6, 6, 2, 1, 0, 5], "loss_start": 3},
        {"input_ids": [4, 6], "loss_start": 1},
        {"input_ids": [0, 0, 3, 5], "loss_start": 2},
        {"input_ids": [6, 1, 1, 2, 5, 0, 3], "loss_start": 6},
        {"input_ids": [2, 4, 6], "loss_start": 1},
    ]
    logp_VV = torch.log_softmax(model.table_VV.detach().double(), dim=-1)
    terms = [
        -float(logp_VV[r["input_ids"][j - 1], r["input_ids"][j]])
        for r in rows
        for j in range(r["loss_start"], len(r["input_ids"]))
    ]
    assert len(terms) == 4 + 2 + 2 + 2 + 8 + 1 + 2 + 1 + 2
    model.train()
    assert heldout_loss(model, rows, pad) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert model.training
    # the same through torch's cross-entropy, one unpadded row at a time, summed and divided once
    total = sum(
        float(
            torch.nn.functional.cross_entropy(
                model.table_VV.detach().double()[torch.tensor(r["input_ids"][r["loss_start"] - 1 : -1])],
                torch.tensor(r["input_ids"][r["loss_start"] :]),
                reduction="sum",
            )
        )
        for r in rows
    )
    assert heldout_loss(model, rows, pad) == pytest.approx(total / len(terms), rel=1e-5)
    uniform = _Bigram(torch.zeros(V, V))
    # float32 log-softmax of zeros: a few float32 ulps of log V on any CPU's exp/log kernels
    assert heldout_loss(uniform, rows, pad) == pytest.approx(math.log(V), rel=1e-5)


def test_lora_trial_never_trains_on_its_heldout_rows_and_scores_them(
    with_prepared: Path, monkeypatch: pytest.MonkeyPatch
):
    """One LoRA trial, watched: the rows the documented hash holds out (first 4 bytes of sha1(id) <
    fraction x 2^32) are exactly the ones scored, none of them is in the data the finetune stage loads or
    feeds to the trainer, and together with the trained rows they are the workspace's prepared data. The
    objective equals the mean cross-entropy over their trained tokens, computed one unpadded row at a time
    from the adapter the trial saved."""
    import collections
    import hashlib

    import pyarrow.parquet as pq

    from lorascope.finetune import data as finetune_data
    from lorascope.models import load_adapter, load_model
    from lorascope.sweep import trial as trial_module

    fraction = 0.3
    table = pq.read_table(with_prepared / "data" / "prepared" / "train.parquet").to_pylist()
    cut = int(fraction * 2**32)
    held = [r for r in table if int.from_bytes(hashlib.sha1(r["id"].encode()).digest()[:4], "big") < cut]
    kept = [r for r in table if r not in held]
    assert 0 < len(held) < len(table)

    def content(r: dict) -> tuple:
        return tuple(r["input_ids"]), r["loss_start"]

    assert not {content(r) for r in held} & {content(r) for r in kept}  # rows tell apart by content

    loaded: list[tuple[Path, list[tuple]]] = []
    fed: list[tuple] = []
    split: list[list[dict]] = []
    init, getitem, split_prepared = (
        finetune_data.PreparedRows.__init__,
        finetune_data.PreparedRows.__getitem__,
        trial_module.split_prepared,
    )

    def spy_init(self, prepared_dir):  # noqa: ANN001, ANN202
        init(self, prepared_dir)
        loaded.append(
            (Path(prepared_dir), list(zip(map(tuple, self.input_ids), self.loss_start, strict=True)))
        )

    def spy_getitem(self, i):  # noqa: ANN001, ANN202
        row = getitem(self, i)
        fed.append(content(row))
        return row

    def spy_split(root, ws, fraction):  # noqa: ANN001, ANN202
        split.append(split_prepared(root, ws, fraction))
        return split[-1]

    monkeypatch.setattr(finetune_data.PreparedRows, "__init__", spy_init)
    monkeypatch.setattr(finetune_data.PreparedRows, "__getitem__", spy_getitem)
    monkeypatch.setattr(trial_module, "split_prepared", spy_split)
    spec = space(validation_fraction=fraction)
    params = tiny_params(**FAST)
    trial = _Trial()
    with trial_module.trial_workspace(
        with_prepared,
        "split",
        0,
        trial_module.LORA_INPUTS,
        store=with_prepared,
        tracking_uri=tracking.tracking_uri(),
    ) as ws:
        [value] = trial_module.run_lora(trial, params, spec, with_prepared, ws)
        written = pq.read_table(ws / "data" / "prepared" / "train.parquet").to_pylist()
        model = load_adapter(load_model(ws / "models" / "base"), ws / "models" / "lora").eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for r in held:
                ids = torch.tensor([r["input_ids"]])
                s = r["loss_start"]
                logits = model(input_ids=ids).logits[0].double()
                total += float(
                    torch.nn.functional.cross_entropy(logits[s - 1 : -1], ids[0, s:], reduction="sum")
                )
                tokens += ids.shape[1] - s
    # the split: disjoint, complete, by the documented hash
    assert [r["id"] for r in written] == [r["id"] for r in kept]
    assert split == [[{"input_ids": r["input_ids"], "loss_start": r["loss_start"]} for r in held]]
    # what training read and fed: the trial's own split, none of the held-out rows
    [(where, rows)] = loaded
    assert where == ws / "data" / "prepared"
    assert collections.Counter(rows) == collections.Counter(content(r) for r in kept)
    assert fed and set(fed) <= set(rows) and not set(fed) & {content(r) for r in held}
    # the objective, independently
    assert value == pytest.approx(total / tokens, rel=1e-5)
    assert trial.reports == [(1, value)]  # the pruner heard it once, at the end of the (cut) first epoch


def test_sae_trial_objective_is_the_fvu_of_the_saved_sae(workspace: Path):
    """``run_sae`` on a planted activation store (data far from zero, so an uncentred variance would be
    far off): the FVU it returns equals a numpy computation from the SAE it saved, on the evaluation
    documents the documented hash picks; the pruner hears the training MSE every ``report_every`` steps;
    a pruned trial stops there; an objective the stage did not measure is an error, not a guess."""
    import numpy as np
    import optuna
    from safetensors.numpy import load_file

    from lorascope.sweep.trial import SAE_INPUTS, run_sae, trial_workspace

    from tests.sae.test_sae import D_IN, SAE, held_out_docs, planted, write_store

    x, _ = planted(4_000, seed=7)
    x = x + torch.linspace(-20.0, 30.0, D_IN)
    write_store(workspace, x)
    for rel in ("models/base", "models/lora"):  # linked into the trial; unread without kl_sequences
        (workspace / rel).mkdir(parents=True)
    params = tiny_params(sae={**SAE, "epochs": 12, "heldout_fraction": 0.2})
    fvu_space = Space(target="sae", objectives=["fvu"], params={"sae.k": {"choices": [3]}}, report_every=7)

    def trial_run(trial: _Trial, spec: Space, n: int) -> tuple[list[float], dict, dict]:
        uri = tracking.tracking_uri()
        with trial_workspace(workspace, "sae", n, SAE_INPUTS, store=workspace, tracking_uri=uri) as ws:
            values = run_sae(trial, params, spec, workspace, ws)
            weights = load_file(str(ws / "models" / "sae" / "sae.safetensors"))
            metrics = json.loads((ws / "metrics" / "sae.json").read_text())
        return values, weights, metrics

    trial = _Trial()
    [fvu], weights, metrics = trial_run(trial, fvu_space, 0)
    held = held_out_docs(20, 0.2)
    X = np.concatenate([x[i * 200 : (i + 1) * 200].numpy() for i in held[1::2]]).astype(np.float64)
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    pre = np.maximum((X - w["b_dec_D"]) @ w["W_enc_DF"] + w["b_enc_F"], 0.0)
    f = np.where(pre > float(w["threshold"]), pre, 0.0)
    err = ((f @ w["W_dec_FD"] + w["b_dec_D"] - X) ** 2).sum()
    var = ((X - X.mean(0)) ** 2).sum()
    assert fvu == metrics["fvu"] and metrics["eval_tokens"] == len(X)
    assert fvu == pytest.approx(err / var, rel=1e-4) and 0 < fvu < 1  # beats the mean
    steps = int(12 * (20 - len(held)) * 200) // 256  # epochs x training tokens // batch
    assert [s for s, _ in trial.reports] == list(range(7, steps + 1, 7))
    assert all(math.isfinite(v) and v > 0 for _, v in trial.reports)
    assert trial.reports[-1][1] < trial.reports[0][1]  # training lowers the MSE it reports

    pruned = _Trial(prune=True)
    with pytest.raises(optuna.TrialPruned, match=r"training mse .* at step 7"):
        trial_run(pruned, fvu_space, 1)
    assert [s for s, _ in pruned.reports] == [7]

    both = Space(target="sae", objectives=["fvu", "kl_lora_spliced"], params={"sae.k": {"choices": [3]}})
    with pytest.raises(LorascopeError, match=r"objectives \['kl_lora_spliced'\] not measured"):
        trial_run(_Trial(), both, 2)
    assert not (workspace / "sweeps" / "sae").exists()  # every trial workspace removed, failed ones too
