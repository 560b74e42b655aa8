"""float16 through the stages that run the model on the CPU (bfloat16 everywhere runs through `dvc repro`:
`tests/e2e/test_bf16.py`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import tiny_params


def test_model_stages_run_in_float16(with_prepared: Path):
    """float16 (the other reduced precision) through the stages that run the model on the CPU:
    extraction, the SAE's splice KL and the ablations (training in fp16 needs a GPU)."""
    from lorascope.ablate.stage import run as ablate
    from lorascope.extract.stage import run as extract
    from lorascope.extract.store import Store
    from lorascope.sae.stage import run as sae

    from tests.extract.test_extract import make_adapter

    make_adapter(with_prepared)
    params = tiny_params(
        extract={"precision": "float16"}, sae={"precision": "float16"}, ablate={"precision": "float16"}
    )
    store = Store.open(extract(params, "lora"))
    assert store.index["precision"] == "float16" and store.index["method"] == "merged"
    sae(params)
    metrics = json.loads((with_prepared / "metrics/sae.json").read_text())
    assert metrics["kl_lora_base"] > 0 and 0 <= metrics["kl_lora_spliced"] < metrics["kl_lora_base"]
    ablate(params)
    groups = json.loads((with_prepared / "metrics/ablation/groups.json").read_text())
    assert all(math.isfinite(a["kl"]) for a in groups["ablations"].values())
    assert groups["ablations"]["all"]["kl"] == pytest.approx(groups["reference"]["kl_lora_base"])
