"""Run and read Optuna studies: storage, sampler, pruner, the parent MLflow run, the best params.

Storage: ``sqlite:///<repo>/optuna.db`` by default; ``journal:<file>`` (Optuna's file journal, for
several processes on one machine); any RDB URL (``postgresql://...``) for a cluster. Several
``lorascope sweep`` processes join one study by name; the study's ``n_trials`` caps the total.

MLflow: one parent run per study, made by the process whose ``create_study`` created the study (the
storage lets exactly one succeed) and recorded in the study (``mlflow_parent_run_id``) before any trial
can run; a joining process reads it. Each trial's stage run is nested under it with MLflow's own API
(``start_run(parent_run_id=...)``). optuna-integration's ``MLflowCallback`` is not used: it would log a
second, thinner run per trial beside the stage run that holds the trial's metrics and lineage.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.project import store_root
from lorascope.sweep.space import Space, dump_overrides, overrides, suggest

PARENT_ATTR = "mlflow_parent_run_id"
PARENT_WAIT_S = 10.0
"""How long a joining process waits for the creator of a study to record its parent run (the creator
writes it right after creating the study: milliseconds)."""
STAGE = {"lora": "finetune", "sae": "sae"}


def storage(url: str | None) -> Any:
    """An Optuna storage from ``--storage``."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    url = url or f"sqlite:///{store_root() / 'optuna.db'}"
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:")).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        )
    except Exception as e:  # bad URL, unreachable server
        raise LorascopeError(
            f"--storage: cannot open {url!r} ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


def _pruner(space: Space) -> Any:
    import optuna

    p = space.pruner
    if p.type == "none" or len(space.objectives) > 1:
        return optuna.pruners.NopPruner()
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if p.type == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, p.n_startup_trials, p.n_warmup_steps)
    return optuna.pruners.MedianPruner(p.n_startup_trials, p.n_warmup_steps)


def open_study(name: str, space: Space, url: str | None) -> Any:
    """Create or join the study ``name``. Creating it also creates its parent MLflow run: made first,
    kept by the one process whose ``create_study`` succeeds (recorded as ``mlflow_parent_run_id``),
    deleted by any other (which joins the study instead)."""
    import optuna
    from optuna.exceptions import DuplicatedStudyError

    from lorascope.tracking import client, create_run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    options = {
        "study_name": name,
        "storage": storage(url),
        "sampler": optuna.samplers.TPESampler(seed=space.seed),
        "pruner": _pruner(space),
    }
    try:
        return optuna.load_study(**options)
    except KeyError:  # no such study yet
        pass
    parent = create_run(
        STAGE[space.target], f"sweep:{name}", {"sweep.study": name, "sweep.target": space.target}
    )
    try:
        study = optuna.create_study(directions=["minimize"] * len(space.objectives), **options)
    except DuplicatedStudyError:  # another process created it first: its parent run stands
        client().delete_run(parent)
        return optuna.load_study(**options)
    study.set_user_attr(PARENT_ATTR, parent)
    return study


def parent_run(study: Any) -> str:
    """The study's parent MLflow run, as its creator recorded it. A process joining within the instant
    between the study's creation and that record waits for it (up to ``PARENT_WAIT_S``); a study that
    never gets one (made outside ``lorascope sweep``) is an error rather than a guess."""
    deadline = time.monotonic() + PARENT_WAIT_S
    while not (parent := study.user_attrs.get(PARENT_ATTR)):
        if time.monotonic() > deadline:
            raise LorascopeError(
                f"study {study.study_name!r} has no MLflow parent run ({PARENT_ATTR}): it was not created "
                "by `lorascope sweep`; delete it (`optuna delete-study`) or pick another --study name"
            )
        time.sleep(0.05)
    return parent


def optimize(
    name: str, space: Space, base: Params, url: str | None, n_trials: int | None = None, n_jobs: int = 1
) -> Any:
    """Run trials of ``name`` until the study holds ``space.n_trials`` (or this process ran
    ``n_trials``), ``n_jobs`` at a time in threads. Failed trials are recorded as failed with their error;
    the study goes on. Each trial runs in its own workspace, given to it (with the store and the tracking
    URI) through context variables, so parallel trials never share a root and ``os.environ`` is untouched."""
    import mlflow
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from lorascope.project import workspace_root
    from lorascope.sweep.trial import LORA_INPUTS, SAE_INPUTS, run_lora, run_sae, trial_workspace
    from lorascope.tracking import client, create_run, extra_tags, nested_under, tracking_uri

    study = open_study(name, space, url)
    parent = parent_run(study)
    root, store, uri = workspace_root(), store_root(), tracking_uri()
    c = client()

    def objective(trial: optuna.Trial) -> Any:
        if trial.number >= space.n_trials:  # numbers are atomic across processes: a racing extra trial
            study.stop()
            trial.set_user_attr("over_cap", True)
            raise optuna.TrialPruned(f"study {name} already has its {space.n_trials} trials")
        values = suggest(trial, space)
        params = overrides(base, values, space.fixed, f"study {name} trial {trial.number}")
        links = LORA_INPUTS if space.target == "lora" else SAE_INPUTS
        tags = {"sweep.study": name, "sweep.trial": str(trial.number)}
        state, error = "complete", None
        try:
            with (
                trial_workspace(root, name, trial.number, links, store=store, tracking_uri=uri) as ws,
                nested_under(parent),
                extra_tags(tags),
            ):
                result = (run_lora if space.target == "lora" else run_sae)(trial, params, space, root, ws)
        except optuna.TrialPruned:
            state = "pruned"
            raise
        except Exception as e:
            state, error = "failed", f"{type(e).__name__}: {e}"
            trial.set_user_attr("error", error)
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            raise
        finally:
            query = f"tags.`sweep.study` = '{name}' and tags.`sweep.trial` = '{trial.number}'"
            run_ids = [r.info.run_id for r in c.search_runs([c.get_run(parent).info.experiment_id], query)]
            if not run_ids:  # it failed before the stage opened its run: record the trial anyway
                with nested_under(parent):
                    run_ids = [create_run(STAGE[space.target], f"trial-{trial.number}", tags)]
                c.set_terminated(run_ids[0], "FAILED" if state == "failed" else "KILLED")
            for run_id in run_ids:
                c.set_tag(run_id, "sweep.state", state)
                c.log_param(run_id, "sweep.overrides", dump_overrides(values)[:6000])
                if error:
                    c.set_tag(run_id, "sweep.error", error[:5000])
                if state == "complete":
                    for objective_name, v in zip(space.objectives, result, strict=True):
                        c.log_metric(run_id, f"objective.{objective_name}", v)
                if state == "pruned":
                    c.set_terminated(run_id, "KILLED")
                trial.set_user_attr("mlflow_run_id", run_id)
        return result[0] if len(result) == 1 else tuple(result)

    cap = MaxTrialsCallback(space.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    mlflow.set_tracking_uri(c.tracking_uri)
    study.optimize(objective, n_trials=n_trials, n_jobs=n_jobs, callbacks=[cap], catch=(Exception,))
    counts: dict[str, float] = {}
    for t in study.trials:
        counts[f"trials_{t.state.name.lower()}"] = counts.get(f"trials_{t.state.name.lower()}", 0) + 1
    for key, value in counts.items():
        c.log_metric(parent, key, value)
    c.set_terminated(parent, "FINISHED")
    return study


def best(name: str, url: str | None) -> tuple[dict[str, Any], list[float], int]:
    """``(params, values, trial number)`` of the best complete trial (the first of the Pareto front
    for a multi-objective study)."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage(url))
    except KeyError:
        raise LorascopeError(f"--study: no study named {name!r} in {url or 'the default storage'}") from None
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise LorascopeError(f"study {name!r}: no complete trial yet")
    trial = study.best_trials[0]
    return dict(trial.params), list(trial.values), trial.number
