"""Pin a real base model (hub id or local directory) without copying it: ``reference.json``."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lorascope.errors import LorascopeError


def _local_reference(path: Path) -> dict[str, Any]:
    config = path / "config.json"
    if not config.is_file():
        raise LorascopeError(f"base.model: {path} is not a model directory (no config.json)")
    digest = hashlib.sha256(config.read_bytes()).hexdigest()
    return {"kind": "local", "model": str(path.resolve()), "revision": f"config-sha256:{digest}"}


def _hub_reference(model_id: str, revision: str) -> dict[str, Any]:
    from huggingface_hub import HfApi, try_to_load_from_cache

    try:
        sha = HfApi().model_info(model_id, revision=revision).sha
        return {"kind": "hub", "model": model_id, "revision": sha, "requested_revision": revision}
    except Exception as online_error:  # offline, gated, unknown id: fall back to the local cache
        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
        if isinstance(cached, str):
            sha = Path(cached).parent.name  # .../snapshots/<commit>/config.json
            return {
                "kind": "hub",
                "model": model_id,
                "revision": sha,
                "requested_revision": revision,
                "resolved_from": "local cache",
            }
        reason = str(online_error).splitlines()[0][:200] if str(online_error) else type(online_error).__name__
        raise LorascopeError(
            f"base.model: cannot resolve revision {revision!r} of hub model {model_id!r}: the hub is not "
            f"reachable ({reason}) and the model is not in the local Hugging Face cache; "
            "point base.model at a local model directory or run where the hub is reachable"
        ) from None


def resolve(model: str, revision: str) -> dict[str, Any]:
    """The reference for ``model``: a local directory if one exists at that path, else a hub id."""
    path = Path(model).expanduser()
    return _local_reference(path) if path.exists() else _hub_reference(model, revision)
