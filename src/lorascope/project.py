"""Where the project lives: the workspace root (dvc.yaml, params, profiles) and the store root.

They differ inside ``dvc exp run --temp`` workspaces (``<repo>/.dvc/tmp/exps/<name>/``): params and
code come from the temporary workspace, but MLflow must log to the one store at the real repo root.

``use_workspace`` overrides both for the code running in one context (a thread, an asyncio task): a
sweep runs each trial in its own workspace this way, so parallel trials (``n_jobs > 1``) never see each
other's root and nothing in ``os.environ`` changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

_EXP_TMP = (".dvc", "tmp", "exps")
_OVERRIDE: ContextVar[tuple[Path, Path] | None] = ContextVar("lorascope_workspace", default=None)


@contextmanager
def use_workspace(root: str | Path, store: str | Path) -> Iterator[Path]:
    """Within the block, ``workspace_root()`` is ``root`` and ``store_root()`` is ``store``, for this
    context only (a context variable: other threads, and ``os.environ``, are untouched). Threads
    started inside the block do not inherit it; run them with ``contextvars.copy_context().run``."""
    token = _OVERRIDE.set((Path(root).resolve(), Path(store).resolve()))
    try:
        yield Path(root).resolve()
    finally:
        _OVERRIDE.reset(token)


def workspace_root(start: str | Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) holding ``dvc.yaml`` or ``.dvc/``.

    ``use_workspace`` overrides, then ``LORASCOPE_ROOT``; with no marker found the start directory
    itself is used. A DVC experiment's temporary workspace (``.dvc/tmp/exps/...``) is always its own
    root, whatever ``LORASCOPE_ROOT`` says: queued experiments inherit the environment of whoever
    started the queue, and must not write into that root.
    """
    if (override := _OVERRIDE.get()) is not None:
        return override[0]
    here = Path(start or Path.cwd()).resolve()
    found = next(
        (d for d in (here, *here.parents) if (d / "dvc.yaml").is_file() or (d / ".dvc").is_dir()), None
    )
    if found is not None and _in_experiment(found):
        return found
    if env := os.environ.get("LORASCOPE_ROOT"):
        return Path(env).resolve()
    return found or here


def _in_experiment(root: Path) -> bool:
    parts = root.parts
    return any(parts[i : i + len(_EXP_TMP)] == _EXP_TMP for i in range(len(parts) - len(_EXP_TMP)))


def store_root(start: str | Path | None = None) -> Path:
    """The repository that owns the tracking store: the workspace root, or for a DVC temp
    experiment workspace the repository that contains it (``use_workspace`` overrides)."""
    if (override := _OVERRIDE.get()) is not None:
        return override[1]
    root = workspace_root(start)
    parts = root.parts
    for i in range(len(parts) - len(_EXP_TMP)):
        if parts[i : i + len(_EXP_TMP)] == _EXP_TMP:
            return Path(*parts[:i])
    return root
