"""Seed triples as DVC experiments: queued with ``dvc exp run --queue -S ...``, run by ``dvc queue start -j J``,
waited for through ``dvc queue status``.

Each seed is one experiment named ``seed-<i>`` on the current commit (plus the workspace's changes, which
DVC stashes into the queue entry), so ``dvc exp show`` lists them beside any other experiment and every
stage of each logs its own MLflow runs into the repository's store. An older experiment of the same name
on the same commit is removed first, so a name always means the latest run.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorascope.errors import LorascopeError

SEEDED = ("base", "finetune", "sae")
"""The params sections whose ``seed`` a seed triple sets."""
_STATUS = re.compile(r"^([0-9a-f]{7,})\s+(\S+)\s+.*?\s(\w+)\s*$")
DONE = ("Success", "Failed")


@dataclass(frozen=True)
class Task:
    """A queued experiment."""

    id: str
    name: str
    status: str


def experiment_name(seed: int) -> str:
    return f"seed-{seed}"


def _env() -> dict[str, str]:
    """The environment of the DVC commands: without ``LORASCOPE_ROOT``, so each experiment resolves its
    root from the temporary workspace it runs in."""
    return {k: v for k, v in os.environ.items() if k != "LORASCOPE_ROOT"}


def dvc(root: Path, *args: str, check: bool = True) -> str:
    """Run ``dvc <args>`` in ``root``; its stdout (a one-line error with its last message on failure)."""
    done = subprocess.run(["dvc", *args], cwd=root, env=_env(), capture_output=True, text=True)
    if check and done.returncode:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise LorascopeError(f"dvc {' '.join(args[:3])}: {last}")
    return done.stdout


def tasks(root: Path) -> dict[str, Task]:
    """Every task ``dvc queue status`` lists, by id."""
    out = {}
    for line in dvc(root, "queue", "status").splitlines():
        m = _STATUS.match(line.strip())
        if m:
            out[m[1]] = Task(m[1], m[2], m[3])
    return out


def overrides(seed: int, vary: Sequence[str]) -> list[str]:
    """``-S`` arguments setting ``<section>.seed`` for each varied section."""
    return [arg for section in vary for arg in ("-S", f"{section}.seed={seed}")]


def queue(root: Path, seeds: Sequence[int], vary: Sequence[str]) -> dict[int, str]:
    """Queue one experiment per seed; returns seed -> task id."""
    names = [experiment_name(s) for s in seeds]
    existing = set(dvc(root, "exp", "list", "--name-only", check=False).split())
    if stale := [n for n in names if n in existing]:
        dvc(root, "exp", "remove", *stale)
    before = set(tasks(root))
    ids: dict[int, str] = {}
    for seed, name in zip(seeds, names, strict=True):
        dvc(root, "exp", "run", "--queue", "-n", name, *overrides(seed, vary))
        new = {t.id: t for t in tasks(root).values() if t.id not in before and t.name == name}
        if len(new) != 1:
            raise LorascopeError(f"dvc queue status: cannot find the task queued for {name}")
        ids[seed] = next(iter(new))
        before.add(ids[seed])
    return ids


def run(
    root: Path, ids: dict[int, str], jobs: int, progress: Callable[[int], None], poll_s: float = 5.0
) -> dict[int, str]:
    """Start ``jobs`` queue workers and wait for the tasks ``ids``; returns seed -> final status;
    ``progress`` is told how many have ended after each poll."""
    dvc(root, "queue", "start", "-j", str(jobs))
    while True:
        status = tasks(root)
        state = {seed: status[i].status if i in status else "Failed" for seed, i in ids.items()}
        progress(sum(s in DONE for s in state.values()))
        if all(s in DONE for s in state.values()):
            return state
        time.sleep(poll_s)


def failure(root: Path, seed: int) -> str:
    """Why a seed's experiment failed: the last error line of its log."""
    log = dvc(root, "queue", "logs", experiment_name(seed), check=False)
    errors = [line.strip() for line in log.splitlines() if line.strip().startswith(("error:", "ERROR:"))]
    lines = errors or [line.strip() for line in log.splitlines() if line.strip()]
    return lines[0] if errors else (lines[-1] if lines else "failed (no log)")
