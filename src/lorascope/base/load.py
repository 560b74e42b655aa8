"""Load what the ``base`` stage wrote: a tiny model directory or a ``reference.json`` to a real one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorascope.errors import LorascopeError


def source(base_dir: str | Path) -> tuple[str, str | None]:
    """``(name_or_path, revision)`` to pass to ``from_pretrained``."""
    base_dir = Path(base_dir)
    ref = base_dir / "reference.json"
    if ref.is_file():
        data = json.loads(ref.read_text())
        return data["model"], data["revision"] if data.get("kind") == "hub" else None
    if (base_dir / "config.json").is_file():
        return str(base_dir), None
    raise LorascopeError(
        f"{base_dir}: no base model here (expected config.json or reference.json); run `lorascope base`"
    )


def model_name(base_dir: str | Path) -> str:
    """How adapters and runs name the base: the hub id, or a path relative to the workspace root
    when the model lives inside it (so outputs do not embed this machine's absolute paths)."""
    from lorascope.project import workspace_root

    name, _ = source(base_dir)
    path, root = Path(name), workspace_root()
    if path.is_absolute() and path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    return name


def load_tokenizer(base_dir: str | Path) -> Any:
    """The base model's tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    name, revision = source(base_dir)
    return AutoTokenizer.from_pretrained(name, revision=revision)


def load_model(base_dir: str | Path, **kwargs: Any) -> Any:
    """The base causal LM; ``kwargs`` go to ``from_pretrained`` (dtype, device_map, ...)."""
    from transformers import AutoModelForCausalLM

    name, revision = source(base_dir)
    return AutoModelForCausalLM.from_pretrained(name, revision=revision, **kwargs)
