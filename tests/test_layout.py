"""The source's shape (#29): models load in one module, and every function is short enough to read."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lorascope"
MODELS = SRC / "models.py"


def _sources() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert MODELS in files and len(files) > 50  # the package, not an empty glob
    return files


def test_models_load_only_in_models_py():
    """``from_pretrained`` and ``PeftModel`` (weights, configs, tokenizers, adapters) appear in
    ``models.py`` alone: one place decides how a model is found, loaded and in which dtype."""
    loading = re.compile(r"from_pretrained|PeftModel")
    found = [
        f"{path.relative_to(SRC.parent)}:{n}"
        for path in _sources()
        if path != MODELS
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if loading.search(line)
    ]
    assert found == [], f"model loading outside models.py: {found}"
    assert loading.search(MODELS.read_text())
