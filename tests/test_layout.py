"""The source's shape (#29): models load in one module, and every function is short enough to read."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lorascope"
MODELS = SRC / "models.py"
MAX_FUNCTION_LINES = 80
MAX_STAGE_RUN_LINES = 60
"""A stage's ``run`` reads as its named steps (open the run, claim the work, each step, log the outputs)."""


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


def _function_lengths() -> list[tuple[int, str, str]]:
    """``(lines, file, name)`` of every function and method, lines as ``end_lineno - lineno + 1``."""
    return [
        (node.end_lineno - node.lineno + 1, str(path.relative_to(SRC.parent)), node.name)  # type: ignore[operator]
        for path in _sources()
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def test_no_function_is_longer_than_80_lines():
    long = sorted((f for f in _function_lengths() if f[0] > MAX_FUNCTION_LINES), reverse=True)
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {long}"


def test_every_stage_run_is_at_most_60_lines():
    runs = [f for f in _function_lengths() if f[1].endswith("/stage.py") and f[2].startswith("run")]
    assert len(runs) >= 13  # every stage module's run (and evaluate's run_recovery)
    long = sorted((f for f in runs if f[0] > MAX_STAGE_RUN_LINES), reverse=True)
    assert long == [], f"stage runs over {MAX_STAGE_RUN_LINES} lines: {long}"
