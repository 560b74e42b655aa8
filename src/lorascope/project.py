"""Where the project lives: the workspace root (dvc.yaml, params, profiles) and the store root.

They differ inside ``dvc exp run --temp`` workspaces (``<repo>/.dvc/tmp/exps/<name>/``): params and
code come from the temporary workspace, but MLflow must log to the one store at the real repo root.
"""

from __future__ import annotations

import os
from pathlib import Path

_EXP_TMP = (".dvc", "tmp", "exps")


def workspace_root(start: str | Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) holding ``dvc.yaml`` or ``.dvc/``.

    ``LORASCOPE_ROOT`` overrides; with no marker found the start directory itself is used.
    """
    if env := os.environ.get("LORASCOPE_ROOT"):
        return Path(env).resolve()
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file() or (d / ".dvc").is_dir():
            return d
    return here


def store_root(start: str | Path | None = None) -> Path:
    """The repository that owns the tracking store: the workspace root, or for a DVC temp
    experiment workspace the repository that contains it."""
    root = workspace_root(start)
    parts = root.parts
    for i in range(len(parts) - len(_EXP_TMP)):
        if parts[i : i + len(_EXP_TMP)] == _EXP_TMP:
            return Path(*parts[:i])
    return root
