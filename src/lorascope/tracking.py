"""The one way a stage opens its MLflow run: experiment, tags, lineage, inputs and ``run.json``.

Every run carries ``lorascope.stage``, the git commit and dirty flag, the params section's hash, the
DVC md5 of each input and ``upstream.<stage>`` = the run that produced each input (read from the
``run.json`` beside it). Each stage writes ``run.json`` (run id, stage, output digests) into its
output directory so the next stage can link back. The store defaults to ``sqlite:///<repo>/mlflow.db``
with artifacts in ``<repo>/mlruns/``, absolute so ``dvc exp run --temp`` workspaces log to the same
store; ``MLFLOW_TRACKING_URI`` overrides it (a real ``mlflow server`` works unchanged).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope.atomic import write_json
from lorascope.config import Params, dump_params, section_dict, section_hash
from lorascope.project import store_root, workspace_root

RUN_FILE = "run.json"
EXPERIMENT_PREFIX = "lorascope-"
_EXTRA_TAGS: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("lorascope_extra_tags", default=())


@contextmanager
def extra_tags(tags: dict[str, str]) -> Iterator[None]:
    """Add ``tags`` to every stage run opened inside the block (a sweep nests its trials this way:
    ``mlflow.parentRunId`` plus the study and trial)."""
    token = _EXTRA_TAGS.set((*_EXTRA_TAGS.get(), *tags.items()))
    try:
        yield
    finally:
        _EXTRA_TAGS.reset(token)


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the sqlite store at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root() / 'mlflow.db'}"


def artifact_root() -> Path | None:
    """Artifacts of a local sqlite store: ``mlruns/`` beside the database file (one folder per
    experiment). None for a tracking server, which places artifacts itself."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "mlruns"
    return None


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
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root()
    location = (root / stage).as_uri() if root else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ------------------------------------------------------------------------------------- digests
def dvc_md5(path: str | Path) -> str:
    """The md5 DVC records for ``path``: the file's md5, or ``<md5>.dir`` for a directory."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_data.hashfile.hash import file_md5
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    fs, path = LocalFileSystem(), str(Path(path).resolve())
    if not Path(path).is_dir():
        return file_md5(path, fs)
    odb = HashFileDB(MemoryFileSystem(), "/lorascope-staging")
    _, _, obj = build(odb, path, fs, "md5")
    return obj.hash_info.value


def file_digests(directory: str | Path) -> dict[str, str]:
    """md5 of every file below ``directory`` (relative posix paths), excluding ``run.json``."""
    from dvc_data.hashfile.hash import file_md5
    from dvc_objects.fs.local import LocalFileSystem

    directory, fs = Path(directory), LocalFileSystem()
    return {
        p.relative_to(directory).as_posix(): file_md5(str(p), fs)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != RUN_FILE
    }


def manifest_path(path: str | Path) -> Path:
    """Where the ``run.json`` describing ``path`` lives: inside a directory; for a file
    ``<stem>.parquet`` the sibling ``<stem>.run.json`` (several outputs share a folder), else
    ``run.json`` beside it."""
    path = Path(path)
    if path.is_dir():
        return path / RUN_FILE
    own = path.with_name(f"{path.name.split('.')[0]}.{RUN_FILE}")
    return own if own.is_file() else path.parent / RUN_FILE


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` that describes ``path`` (see ``manifest_path``)."""
    manifest = manifest_path(path)
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None


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
    """An open stage run: its MLflow run id and what it needs to write ``run.json``."""

    stage: str
    run_id: str
    params_hash: str
    upstream: dict[str, str] = field(default_factory=dict)
    inputs_md5: dict[Path, str] = field(default_factory=dict)
    """The DVC md5 of each input, as tagged (a stage keys caches on it instead of hashing again)."""

    def fingerprint(self) -> str:
        """16 hex digits of the params section and the inputs: equal exactly when a resumable
        stage's saved partial work is still valid."""
        import hashlib

        blob = json.dumps({"params": self.params_hash, "inputs": sorted(self.inputs_md5.values())})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def write_manifest(
        self, out_dir: str | Path, extra: dict[str, Any] | None = None, files: Sequence[Path] = ()
    ) -> dict[str, Any]:
        """Write ``run.json`` into ``out_dir`` (typically the temp dir before its atomic rename),
        listing the digest of every file in it. With ``files`` (outputs that share a folder with
        other stages' files), write ``<stem>.run.json`` beside the first of them and list only them."""
        from dvc_data.hashfile.hash import file_md5
        from dvc_objects.fs.local import LocalFileSystem

        if files:
            fs = LocalFileSystem()
            outputs = {p.name: file_md5(str(p), fs) for p in files}
            target = files[0].with_name(f"{files[0].name.split('.')[0]}.{RUN_FILE}")
        else:
            outputs, target = file_digests(out_dir), Path(out_dir) / RUN_FILE
        manifest = {
            "run_id": self.run_id,
            "stage": self.stage,
            "params_hash": self.params_hash,
            "upstream": self.upstream,
            "outputs": outputs,
            **(extra or {}),
        }
        write_json(target, manifest)
        return manifest


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
    produced it (its ``run.json``) an ``upstream.<stage>`` tag. ``section`` names the params
    section (default: the stage name). A failing body ends the run as FAILED and re-raises.
    """
    import mlflow

    section = section or stage
    exp_id = experiment_id(stage)
    root = workspace_root()
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
        rel = path.resolve().relative_to(root) if path.resolve().is_relative_to(root) else path
        inputs_md5[path] = run_tags[f"dvc.md5.{rel.as_posix()}"] = dvc_md5(path)
        manifest = read_manifest(path)
        if manifest and "stage" in manifest and "run_id" in manifest:
            key = manifest["stage"]
            if upstream.get(key, manifest["run_id"]) != manifest["run_id"]:  # several runs of one stage
                key = f"{key}.{path.name.split('.')[0]}"
            upstream[key] = manifest["run_id"]
            run_tags[f"upstream.{key}"] = manifest["run_id"]
    run_tags.update(tags or {})
    run_tags.update(dict(_EXTRA_TAGS.get()))

    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=run_tags) as active:
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


def create_run(stage: str, name: str, tags: dict[str, str]) -> str:
    """A bare run in ``lorascope-<stage>`` (a sweep's parent run, or the record of a trial that
    failed before its stage opened a run); returns its id."""
    c = client()
    commit, dirty = git_state()
    run = c.create_run(
        experiment_id(stage),
        run_name=name,
        tags={"lorascope.stage": stage, "git.commit": commit, "git.dirty": dirty, **tags},
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
