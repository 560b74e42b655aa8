"""Resumable work: the one test of whether a stage's saved partial work is still valid.

A resumable stage keeps its partial work (a checkpoint file or a work directory) under
``checkpoints/`` and claims it with its stage run's fingerprint (``StageRun.claim``): the hash of its
params section and the DVC md5 of each input (by workspace-relative path), both computed once when the
run opened, and stage-specific extras (the variant, the source). The fingerprint sits in a marker beside the work, ``<work>.fingerprint.json``, written atomically, so it
never ends up inside what the work becomes (a store moved into ``data/``). ``claim`` keeps the work
when the marker matches and otherwise removes it and writes the new marker: a run with other params
or inputs starts over, one with the same resumes. Markers hold no run ids and no absolute paths.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lorascope.atomic import write_json

MARKER_SUFFIX = ".fingerprint.json"


def marker(work: Path) -> Path:
    """``<work>.fingerprint.json``, beside the work."""
    return work.with_name(f"{work.name}{MARKER_SUFFIX}")


def matches(work: Path, fp: dict[str, Any]) -> bool:
    """Whether ``work`` was claimed with this fingerprint."""
    path = marker(work)
    try:
        return path.is_file() and json.loads(path.read_text()) == fp
    except ValueError:  # a marker that is not JSON belongs to no run
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def claim(work: Path, fp: dict[str, Any]) -> bool:
    """Keep ``work`` (file or directory) when it was claimed with ``fp`` and return True; otherwise
    remove it, claim it with ``fp`` and return False. The work itself is the caller's to create."""
    if matches(work, fp):
        return True
    _remove(work)  # before the new marker: a kill in between leaves no stale work under it
    write_json(marker(work), fp)
    return False


def release(work: Path) -> None:
    """Remove ``work`` (if still there) and its marker once the stage's outputs are in place."""
    _remove(work)
    marker(work).unlink(missing_ok=True)
