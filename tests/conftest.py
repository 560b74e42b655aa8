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
# the CPU kernels every `lorascope` process pins (params `kernels`, on by default), set before torch loads
# so that in-process stage runs write what the CLI writes on any x86-64 machine
from lorascope.kernels import KernelsSection, wanted  # noqa: E402

os.environ.update(wanted(KernelsSection()))

import copy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402

# tests/mutation.py runs mutants with `--hypothesis-profile=mutation`: a failing example kills the mutant,
# so shrinking it to the smallest one (the slowest part of a failure) is skipped
settings.register_profile("mutation", phases=[Phase.explicit, Phase.reuse, Phase.generate])

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
QWEN_TOKENIZER = SHARED_DATA / "qwen2.5-tokenizer"
REQUIRE_SHARED = "LORASCOPE_REQUIRE_SHARED"
"""Set to 1 (the GitHub workflow sets it) and a test that skips because ``../shared`` lacks what it needs
(its skip reason names the path) fails instead: a CI without the data must not pass those checks silently.
Unset (``.ci/run``, a clean clone without ``../shared``), they skip with the path they looked for."""


SUMMARY = "lorascope-summary"
"""The user property under which a test hands markdown to the end of the session's output (the tiny
repro's Tables 1 and 2): properties travel with the test's report, so an xdist worker's reach the
terminal too."""
_summary: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under `pytest -n N` (xdist's default `load` distribution): each end-to-end module (tests/e2e/*.py)
    runs whole on one worker, the longest first, so its module-scoped `dvc repro` is made once and the two
    repros run side by side; every other test goes to whichever worker is free. (`--dist loadgroup` would
    say this with marks, but it does not group under pytest 9: pytest-dev/pytest-xdist#1386.)"""
    if config.getvalue("dist") != "load":
        return None  # a distribution asked for by name
    from xdist.scheduler import LoadScopeScheduling

    class EndToEndModulesWhole(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if Path(module).parent.name == "e2e" else nodeid

    return EndToEndModulesWhole(config, log)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _summary.extend(
        value for name, value in report.user_properties if name == SUMMARY and report.when == "call"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    if report.skipped and os.environ.get(REQUIRE_SHARED) == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if str(REPO.parent / "shared") in reason or "../shared" in reason:
            report.outcome = "failed"
            report.longrepr = f"{REQUIRE_SHARED}=1, and this test skipped for want of shared data: {reason}"
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _summary:
        terminalreporter.section("the tiny profile's dvc repro (tests/e2e/test_e2e.py)")
        for text in _summary:
            terminalreporter.write_line(text)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


PLUMBING = {
    # 4 heads: at random initialisation every layer-0 o_proj input is close to one average of the values,
    # and with the organism's 2 heads some test adapters' directions then never fire on one side
    "base": {"tiny": {"pretrain": {"steps": 0}, "num_attention_heads": 4}},
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


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``lorascope <args>`` through its console entry point (``lorascope.cli:main``) in this process, as
    a shell would run it: argv, working directory and extra environment set for the call, stdout and
    stderr captured, the exit status returned (an uncaught exception prints its traceback and exits 1, as
    Python does). In-process, so a call costs no interpreter start-up and imports; the installed script
    itself runs in tests/test_cli.py and in every `dvc repro` of tests/e2e/test_e2e.py."""
    import contextlib
    import io
    import traceback

    from lorascope.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(sys, "argv", ["lorascope", *args])
        if cwd is not None:
            mp.chdir(cwd)
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["lorascope", *args], code, out.getvalue(), err.getvalue())


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


def serve(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    """Start ``cmd`` (an MLflow server) in its own process group, output to ``log``, and wait up to 120 s
    for ``/health`` on ``port``; a server that exits or never answers fails the test with its log's tail.
    Stop it with ``os.killpg(proc.pid, signal.SIGTERM)`` (its workers are in the group)."""
    import signal
    import time
    import urllib.request

    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{Path(cmd[0]).name} did not start: " + log.read_text()[-2000:])
        time.sleep(0.5)


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
