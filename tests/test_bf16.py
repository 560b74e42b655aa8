"""Every stage on the tiny profile with every precision set to bfloat16, on the CPU: the stage
functions run in order in one workspace (the `dvc repro` variant lives with the end-to-end tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_params

BF16 = {
    "finetune": {"precision": "bfloat16"},
    "extract": {"precision": "bfloat16", "dtype": "bfloat16"},
    "sae": {"precision": "bfloat16"},
    "ablate": {"precision": "bfloat16"},
    # the plumbing base is untrained: no label names backtracking, so steer named directions
    "steer": {"precision": "bfloat16", "directions": ["L1.gate_proj", "sae.0"]},
    "evaluate": {"dtype": "bfloat16"},
}


def test_every_stage_runs_in_bfloat16(with_prepared: Path):
    from safetensors import safe_open

    from lorascope.ablate.export import run_export
    from lorascope.ablate.stage import run as ablate
    from lorascope.autointerp.stage import run as autointerp
    from lorascope.categorize.stage import run as categorize
    from lorascope.contexts.stage import run as contexts
    from lorascope.evaluate.stage import run as evaluate
    from lorascope.evaluate.stage import run_recovery
    from lorascope.extract.stage import run as extract
    from lorascope.extract.store import Store
    from lorascope.finetune.stage import run as finetune
    from lorascope.report.stage import run as report
    from lorascope.sae.stage import run as sae
    from lorascope.steer.stage import run as steer

    root = with_prepared
    params = tiny_params(**BF16)
    assert params.finetune.precision == params.extract.precision == params.sae.precision == "bfloat16"
    assert params.ablate.precision == params.steer.precision == params.evaluate.dtype == "bfloat16"

    for variant in ("lora", "full"):
        finetune(params, variant)
    with safe_open(str(root / "models/lora/adapter_model.safetensors"), "pt") as f:
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"F32"}  # the LoRA itself stays fp32
    with safe_open(str(root / "models/full/model.safetensors"), "pt") as f:
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}  # trained in bf16

    for source in ("lora", "mlp"):
        store = Store.open(extract(params, source))
        assert store.index["precision"] == "bfloat16" and store.index["dtype"] == "bfloat16"
        acts, _ = store.read(store.shards[0])
        assert acts.dtype == torch.bfloat16 and bool(torch.isfinite(acts.float()).all())
        assert float(acts.float().std()) > 0

    sae(params)
    sae_metrics = json.loads((root / "metrics/sae.json").read_text())
    assert 0 < sae_metrics["fvu"] < 1
    assert math.isfinite(sae_metrics["kl_lora_spliced"]) and sae_metrics["kl_lora_base"] > 0

    for source in ("lora", "mlp", "sae"):
        contexts(params, source)
        autointerp(params, source)
    categorize(params)

    ablate(params)
    groups = json.loads((root / "metrics/ablation/groups.json").read_text())
    kls = [a["kl"] for a in groups["ablations"].values()]
    assert all(math.isfinite(k) and k >= -1e-6 for k in kls)
    assert groups["ablations"]["all"]["kl"] == pytest.approx(groups["reference"]["kl_lora_base"])
    for group in params.ablate.export:
        run_export(params, group)

    steer(params)
    assert (root / "metrics/steer.json").is_file()

    for variant in params.evaluate.variants:
        evaluate(params, variant)
    run_recovery(params)
    assert (root / "metrics/recovery.json").is_file()

    report(params)
    assert (root / "reports/index.html").is_file()


def test_model_stages_run_in_float16(with_prepared: Path):
    """float16 (the other reduced precision) through the stages that run the model on the CPU:
    extraction, the SAE's splice KL and the ablations (training in fp16 needs a GPU)."""
    from lorascope.ablate.stage import run as ablate
    from lorascope.extract.stage import run as extract
    from lorascope.extract.store import Store
    from lorascope.sae.stage import run as sae
    from test_extract import make_adapter

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
