"""The one way a stage opens its MLflow run: experiment, tags, lineage by digest, inputs and outputs.

Every run carries ``lorascope.stage``, the git commit and dirty flag, the params section's hash, the
DVC md5 of each input (``dvc.md5.<path>``) and of each output it wrote (``dvc.out.<path>``), and
``upstream.<stage>`` = the run that logged the input's md5 as an output. Lineage lives in the tracking
store only: DVC outputs hold nothing run-specific, so a re-run with the same inputs and params writes
the same bytes and leaves every later stage cached. The store defaults to ``sqlite:///<repo>/mlflow.db``
with artifacts in ``<repo>/mlruns/``, absolute so ``dvc exp run --temp`` workspaces log to the same
store; ``MLFLOW_TRACKING_URI`` overrides it (a real ``mlflow server`` works unchanged), and
``use_tracking_uri`` overrides both for one context (a sweep's trial). ``nested_under`` makes every run
opened in a context a child of one parent run (MLflow's nested runs: ``start_run(parent_run_id=...)``).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope import experiments
from lorascope.config import Params, dump_params, section_dict, section_hash
from lorascope.project import store_root, workspace_root

INPUT_TAG = "dvc.md5."
OUTPUT_TAG = "dvc.out."
EXPERIMENT_PREFIX = experiments.PREFIX
_EXTRA_TAGS: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("lorascope_extra_tags", default=())
_TRACKING_URI: ContextVar[str | None] = ContextVar("lorascope_tracking_uri", default=None)
_PARENT_RUN: ContextVar[str | None] = ContextVar("lorascope_parent_run", default=None)


@contextmanager
def extra_tags(tags: dict[str, str]) -> Iterator[None]:
    """Add ``tags`` to every stage run opened inside the block (a sweep tags its trials' runs with the
    study and the trial; ``nested_under`` nests them)."""
    token = _EXTRA_TAGS.set((*_EXTRA_TAGS.get(), *tags.items()))
    try:
        yield
    finally:
        _EXTRA_TAGS.reset(token)


@contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Log to ``uri`` from the code in this context (passed explicitly: no environment variable is set)."""
    token = _TRACKING_URI.set(uri)
    try:
        yield
    finally:
        _TRACKING_URI.reset(token)


@contextmanager
def nested_under(parent_run_id: str) -> Iterator[None]:
    """Open every stage run (and ``create_run``) in this context as a child of ``parent_run_id``."""
    token = _PARENT_RUN.set(parent_run_id)
    try:
        yield
    finally:
        _PARENT_RUN.reset(token)


def tracking_uri() -> str:
    """``use_tracking_uri``'s, else ``MLFLOW_TRACKING_URI`` if set, else the sqlite store at the
    repository root."""
    return (
        _TRACKING_URI.get()
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{store_root() / 'mlflow.db'}"
    )


def local_db() -> Path | None:
    """The database file of a local sqlite store; None for a tracking server."""
    uri = tracking_uri()
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_root() -> Path | None:
    """Artifacts of a local sqlite store: ``mlruns/`` beside the database file (one folder per
    experiment). None for a tracking server, which places artifacts itself."""
    db = local_db()
    return None if db is None else db.parent / "mlruns"


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client() -> Any:
    """An ``MlflowClient`` on the project's store."""
    import mlflow

    _quiet_mlflow()
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def experiment_id(stage: str) -> str:
    """Get or create ``lorascope-<stage>``; safe when several processes race to create it."""
    from mlflow.exceptions import MlflowException

    c = client()
    name = EXPERIMENT_PREFIX + stage
    face = experiments.tags(stage)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        root = artifact_root()
        location = (root / stage).as_uri() if root else None
        try:
            return c.create_experiment(name, artifact_location=location, tags=face)
        except MlflowException:
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    for key, value in face.items():  # an experiment created before the tags (or edited by hand)
        if exp.tags.get(key) is None:
            c.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def _update_view(c: Any, stage: str, experiment: str, run_id: str) -> None:
    """Add the key metrics ``run_id`` logged to its experiment's saved view (``lorascope.experiments``)."""
    tag = c.get_experiment(experiment).tags.get(experiments.VIEW_TAG)
    shown = experiments.view(tag)
    cols = experiments.columns(stage, c.get_run(run_id).data.metrics, shown)
    if cols != shown or tag is None:
        c.set_experiment_tag(experiment, experiments.VIEW_TAG, experiments.view_value(cols))


def local_source(path: str | Path) -> Any:
    """MLflow's dataset source for a local file: its registered local-file class, taken directly (a
    plain path string is ambiguous to its resolver, which registers the class twice)."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    classes: list[Any] = get_registered_sources()  # source classes (mlflow annotates them as instances)
    return next(c for c in classes if c.__name__ == "LocalArtifactDatasetSource")(
        Path(path).resolve().as_uri()
    )


def log_dataset(df: Any, source: Any, name: str, context: str) -> None:
    """``mlflow.log_input`` of ``df`` (a pandas frame) from ``source`` into the active run, as ``name``."""
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    mlflow.log_input(from_pandas(df, source=source, name=name), context=context)


# ------------------------------------------------------------------------------------- digests
def dvc_md5(path: str | Path) -> str:
    """The md5 DVC records for ``path``: the file's md5, or ``<md5>.dir`` for a directory."""
    from dvc.ignore import DvcIgnoreFilter
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_data.hashfile.hash import file_md5
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    fs, path = LocalFileSystem(), str(Path(path).resolve())
    if not Path(path).is_dir():
        return file_md5(path, fs)
    odb = HashFileDB(MemoryFileSystem(), "/lorascope-staging")
    root = workspace_root()
    ignore = DvcIgnoreFilter(fs, str(root)) if Path(path).is_relative_to(root) else None  # as DVC hashes it
    _, _, obj = build(odb, path, fs, "md5", ignore=ignore)
    assert obj.hash_info.value is not None, f"dvc built no md5 for {path}"
    return obj.hash_info.value


def repo_path(path: str | Path) -> str:
    """``path`` as the workspace-relative posix path DVC names it (absolute when outside the workspace)."""
    resolved, root = Path(path).resolve(), workspace_root()
    return (resolved.relative_to(root) if resolved.is_relative_to(root) else resolved).as_posix()


def producer(path: str | Path, md5: str | None = None, name: str | None = None) -> dict[str, str] | None:
    """The latest run that logged ``path`` with this DVC md5 as an output (``dvc.out.<path>``),
    as ``{"run_id", "stage"}``; None when no run did. ``md5`` defaults to the file's current md5;
    ``name`` (default: ``path`` relative to the workspace) is the output's name in the tags."""
    md5 = md5 or dvc_md5(path)
    c = client()
    ids = [e.experiment_id for e in c.search_experiments() if e.name.startswith(EXPERIMENT_PREFIX)]
    if not ids:
        return None
    key = OUTPUT_TAG + (name or repo_path(path))
    found = c.search_runs(
        ids, f"tags.`{key}` = '{md5}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not found:
        return None
    return {"run_id": found[0].info.run_id, "stage": found[0].data.tags.get("lorascope.stage", "?")}


# ----------------------------------------------------------------------------------------- git
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=workspace_root(), capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state() -> tuple[str, str]:
    """``(commit, dirty)`` of the workspace; ``unknown`` outside a git repository."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return "unknown", "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, "unknown" if status is None else str(bool(status)).lower()


# ----------------------------------------------------------------------------------------- runs
def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value
    return out


@dataclass
class StageRun:
    """An open stage run: its MLflow run id, its lineage and the md5 of its inputs."""

    stage: str
    run_id: str
    params_hash: str
    upstream: dict[str, str] = field(default_factory=dict)
    inputs_md5: dict[Path, str] = field(default_factory=dict)
    """The DVC md5 of each input, as tagged (a stage keys caches on it instead of hashing again)."""

    def fingerprint(self, **extra: str) -> dict[str, Any]:
        """What this run's resumable work is claimed with (``lorascope.resume``): the params hash and
        input md5s the run was tagged with (computed once, when it opened) and ``extra`` (the source,
        the variant), keyed by workspace-relative path: no run id and no absolute path, so the next run
        with the same params and inputs finds the same fingerprint."""
        inputs = {repo_path(p): md5 for p, md5 in self.inputs_md5.items()}
        return {"params_hash": self.params_hash, "inputs": dict(sorted(inputs.items())), **extra}

    def claim(self, work: Path, **extra: str) -> bool:
        """Claim ``work`` (a checkpoint file or work directory) for this run: True when it holds work
        of a run with the same fingerprint (resume it), else it was removed (start over)."""
        from lorascope import resume

        return resume.claim(work, self.fingerprint(**extra))

    def log_outputs(self, *paths: str | Path) -> dict[str, str]:
        """Tag the run with the DVC md5 of each output it wrote (``dvc.out.<path>``), once the
        outputs are in place: the next stage finds this run from its input's digest. Returns
        ``{path: md5}``."""
        from mlflow import MlflowClient

        outputs = {repo_path(p): dvc_md5(p) for p in paths}
        c = MlflowClient()
        for path, md5 in outputs.items():
            c.set_tag(self.run_id, OUTPUT_TAG + path, md5)
        return outputs


@contextmanager
def stage_run(
    stage: str,
    params: Params,
    inputs: Sequence[str | Path] = (),
    section: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow run of ``stage`` with the lineage tags and its params section logged.

    ``inputs`` are the stage's DVC deps; each gets a ``dvc.md5.<path>`` tag, and the run that
    logged that md5 as an output (see ``producer``) an ``upstream.<stage>`` tag. ``section`` names the params
    section (default: the stage name). A failing body ends the run as FAILED and re-raises.
    """
    import mlflow

    section = section or stage
    exp_id = experiment_id(stage)
    commit, dirty = git_state()
    phash = section_hash(params, section)
    run_tags = {
        "lorascope.stage": stage,
        "git.commit": commit,
        "git.dirty": dirty,
        "mlflow.source.git.commit": commit,
        "params.section": section,
        "params.hash": phash,
    }
    upstream: dict[str, str] = {}
    inputs_md5: dict[Path, str] = {}
    for path in map(Path, inputs):
        inputs_md5[path] = md5 = dvc_md5(path)
        run_tags[INPUT_TAG + repo_path(path)] = md5
        made_by = producer(path, md5)
        if made_by:
            key = made_by["stage"]
            if upstream.get(key, made_by["run_id"]) != made_by["run_id"]:  # several runs of one stage
                key = f"{key}.{path.name.split('.')[0]}"
            upstream[key] = made_by["run_id"]
            run_tags[f"upstream.{key}"] = made_by["run_id"]
    from lorascope.kernels import in_force

    run_tags.update({f"kernels.{k}": v for k, v in in_force().items()})  # which float kernels wrote it
    run_tags.update(tags or {})
    run_tags.update(dict(_EXTRA_TAGS.get()))

    parent = _PARENT_RUN.get()
    with mlflow.start_run(
        experiment_id=exp_id, run_name=run_name, tags=run_tags, parent_run_id=parent
    ) as active:
        flat = _flatten("", section_dict(params, section), {})
        for i in range(0, len(flat), 100):
            mlflow.log_params(dict(list(flat.items())[i : i + 100]))
        mlflow.log_text(dump_params(params), "params.yaml")
        yield StageRun(
            stage=stage,
            run_id=active.info.run_id,
            params_hash=phash,
            upstream=upstream,
            inputs_md5=inputs_md5,
        )
        _update_view(mlflow.MlflowClient(), stage, exp_id, active.info.run_id)


def create_run(stage: str, name: str, tags: dict[str, str]) -> str:
    """A bare run in ``lorascope-<stage>`` (a sweep's parent run, or the record of a trial that
    failed before its stage opened a run), nested under ``nested_under``'s parent; returns its id."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    c = client()
    commit, dirty = git_state()
    parent = {MLFLOW_PARENT_RUN_ID: p} if (p := _PARENT_RUN.get()) else {}
    run = c.create_run(
        experiment_id(stage),
        run_name=name,
        tags={"lorascope.stage": stage, "git.commit": commit, "git.dirty": dirty, **tags, **parent},
    )
    return run.info.run_id


# -------------------------------------------------------------------------------------- lineage
def lineage(run_id: str) -> dict[str, Any]:
    """The run and, recursively, the runs that produced its inputs (``upstream.*`` tags)."""
    c = client()
    run = c.get_run(run_id)
    tags = run.data.tags
    node: dict[str, Any] = {
        "run_id": run_id,
        "stage": tags.get("lorascope.stage", "?"),
        "experiment": c.get_experiment(run.info.experiment_id).name,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "git_commit": tags.get("git.commit"),
        "git_dirty": tags.get("git.dirty"),
        "params_hash": tags.get("params.hash"),
        "inputs_md5": {k.removeprefix("dvc.md5."): v for k, v in tags.items() if k.startswith("dvc.md5.")},
        "datasets": [
            {
                "name": d.dataset.name,
                "digest": d.dataset.digest,
                "source_type": d.dataset.source_type,
                "source": d.dataset.source,
            }
            for d in run.inputs.dataset_inputs
        ],
        "upstream": [],
    }
    for key, value in sorted(tags.items()):
        if key.startswith("upstream."):
            node["upstream"].append(lineage(value))
    return node
