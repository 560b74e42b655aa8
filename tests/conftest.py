"""Shared test set-up: quiet, single-threaded, offline; one MLflow store and one prepared workspace
per session (creating an MLflow database costs seconds; building the tiny base model too)."""

from __future__ import annotations

import os

for _k, _v in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ[_k] = _v

import copy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
QWEN_TOKENIZER = SHARED_DATA / "qwen2.5-tokenizer"


SUMMARY: list[str] = []
"""Markdown a test hands to the end of the session's output (the tiny repro's Tables 1 and 2)."""


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SUMMARY:
        terminalreporter.section("the tiny profile's dvc repro (tests/test_e2e.py)")
        for text in SUMMARY:
            terminalreporter.write_line(text)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


PLUMBING = {
    "base": {"tiny": {"pretrain": {"steps": 0}}},
    "prepare": {"synthetic": {"n_train": 64, "n_eval": 8}},
    "finetune": {"lr": 1e-3, "full_lr": 1e-4, "epochs": 2, "global_batch_size": 8, "micro_batch_size": 4},
}
"""The tiny profile for the plumbing tests: the model organism's architecture, tokenizer and data, without
its pretraining (a minute of CPU), on fewer rows, finetuned gently (the organism's learning rates are for a
pretrained base: on a random one they blow the adapter state up); tests/test_organism.py runs the profile
as it is."""


def tiny_raw(**sections: dict[str, Any]) -> dict[str, Any]:
    """The repo's params.yaml (the tiny profile) as a dict, with ``PLUMBING`` and then the section
    overrides merged in."""
    raw = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), PLUMBING)
    return deep_merge(raw, sections)


def tiny_params(**sections: dict[str, Any]):  # noqa: ANN201
    from lorascope.config import validate_params

    return validate_params(tiny_raw(**sections))


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 300):
    """Run the installed ``lorascope`` entry point as a user would."""
    exe = Path(sys.executable).parent / "lorascope"
    return subprocess.run(
        [str(exe), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    """A TCP port free right now (for a process group's rendezvous: not the fixed default 29500, which two
    tests running at once under pytest-xdist would both take)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``lorascope <args>`` as two gloo processes on the CPU, in ``root``."""
    accelerate = Path(sys.executable).parent / "accelerate"
    return subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--main_process_port", str(free_port()),
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lorascope.cli", *args],
        cwd=root, capture_output=True, text=True, timeout=600,
        env={**os.environ, "LORASCOPE_ROOT": str(root)},
    )  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite MLflow store for the whole session (artifacts beside it in mlruns/)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{db}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def run_of(root: Path, rel: str) -> str:
    """The id of the MLflow run that logged ``root/rel``'s current content as its output ``rel``."""
    from lorascope.tracking import producer

    made_by = producer(root / rel, name=rel)
    assert made_by is not None, f"no run logged {rel} as an output"
    return made_by["run_id"]


def record_output(stage: str, root: Path, rel: str, tags: dict[str, str] | None = None) -> str:
    """A bare run of ``stage`` that logged ``root/rel`` as its output (a lineage record for data a
    test made by hand); returns its id."""
    from lorascope.tracking import OUTPUT_TAG, client, create_run, dvc_md5

    run_id = create_run(stage, rel, tags or {})
    client().set_tag(run_id, OUTPUT_TAG + rel, dvc_md5(root / rel))
    return run_id


def make_workspace(path: Path) -> Path:
    """A directory that lorascope recognises as a workspace root (it holds a dvc.yaml)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "dvc.yaml").write_text("stages: {}\n")
    return path


@dataclass
class Prepared:
    root: Path
    commit: str
    base_run: str
    prepare_run: str


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """A git workspace where the tiny ``base`` and ``prepare`` stages ran (in-process)."""
    from lorascope.base.stage import run as run_base
    from lorascope.prepare.stage import run as run_prepare

    root = make_workspace(tmp_path_factory.mktemp("ws"))
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "dvc.yaml"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=root, check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    params = tiny_params()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASCOPE_ROOT", str(root))
        run_base(params)
        run_prepare(params)
    return Prepared(root, commit, run_of(root, "models/base"), run_of(root, "data/prepared"))


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty workspace root for one test (LORASCOPE_ROOT points at it)."""
    root = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("LORASCOPE_ROOT", str(root))
    return root


@pytest.fixture
def with_base(prepared: Prepared, workspace: Path) -> Path:
    """A fresh workspace holding a copy of the session's tiny base model."""
    import shutil

    shutil.copytree(prepared.root / "models" / "base", workspace / "models" / "base")
    return workspace


@pytest.fixture
def with_prepared(prepared: Prepared, workspace: Path) -> Path:
    """A fresh workspace holding copies of the session's tiny base model and prepared data."""
    import shutil

    shutil.copytree(prepared.root / "models" / "base", workspace / "models" / "base")
    shutil.copytree(prepared.root / "data" / "prepared", workspace / "data" / "prepared")
    return workspace
