"""Loading the SAE the ``sae`` stage wrote (``models/sae/``): its weights in raw input space and its cfg."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorascope.sae.model import BatchTopKSAE


def load_sae(directory: Path, device: Any = "cpu") -> tuple[BatchTopKSAE, dict[str, Any]]:
    """The saved SAE (raw input space, on ``device``) and its cfg."""
    from safetensors.torch import load_file

    cfg = json.loads((directory / "cfg.json").read_text())
    sae = BatchTopKSAE(cfg["d_in"], cfg["d_sae"], cfg["k"])
    sae.load_state_dict(load_file(str(directory / "sae.safetensors")))
    return sae.to(device), cfg
