"""End to end in bfloat16 and another seed triple: the tiny profile with every precision key set to bfloat16
and seeds (3, 3, 3) runs every stage of `dvc.yaml` on the CPU, in a fresh git + DVC repo of its own (the plumbing
sizes of conftest.PLUMBING: the base without its pretraining), and bf16 is where it belongs in what it writes.
The stages run as DVC resolves them (each stage's command with this params.yaml's values, in `dvc repro`'s
order), in this process: the commands and the pipeline are what DVC would run, without 26 interpreter start-ups
(tests/e2e/test_e2e.py runs the real `dvc repro`, in float32). A module of its own, so that `pytest -n 2` runs it
beside tests/e2e/test_e2e.py's repro (conftest.pytest_xdist_make_scheduler)."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import cli, tiny_raw
from tests.e2e.test_e2e import ALL_STAGES, fresh_repo, git_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

BF16 = {
    "base": {
        "seed": 3
    },  # a seed triple other than the committed lock's (3, 3, 3): nothing is tuned to one seed
    "finetune": {"precision": "bfloat16", "seed": 3},
    "extract": {"precision": "bfloat16", "dtype": "bfloat16"},
    "sae": {"precision": "bfloat16", "seed": 3},
    "ablate": {"precision": "bfloat16"},
    # the plumbing base is untrained: no label names backtracking, so steer named directions
    "steer": {"precision": "bfloat16", "directions": ["L1.gate_proj", "sae.0"]},
    "evaluate": {"dtype": "bfloat16"},
}
"""Every precision key of the tiny profile set to bfloat16 (and steering directions an untrained base has)."""


@pytest.fixture(scope="module")
def bf16_repro(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A fresh repository whose params are the plumbing tiny profile in bfloat16, after every stage's command
    ran in `dvc repro`'s order: (root, the stages run)."""
    import mlflow
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    from lorascope import tracking

    env = git_env()
    root = fresh_repo(tmp_path_factory, env, yaml.safe_dump(tiny_raw(**BF16), sort_keys=False))
    with Repo(str(root)) as repo:
        plan = [(stage.name, stage.cmd) for stage in plan_repro(repo.index.graph)]
    # the repository's own MLflow store, as `dvc repro` in it would use (git_env drops the session's)
    call_env = {"LORASCOPE_ROOT": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    ran = []
    try:
        for name, cmd in plan:
            program, *args = shlex.split(cmd)
            assert program == "lorascope", f"{name}: {cmd}"  # the tiny profile launches no other program
            res = cli(*args, cwd=root, env=call_env)
            assert res.returncode == 0, f"{name}: {cmd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
            ran.append(name)
    finally:  # MLflow's global store back to the session's, also when a stage failed
        mlflow.set_tracking_uri(tracking.tracking_uri())
    return root, ran


def test_bfloat16_everywhere_through_dvc(bf16_repro):
    """The tiny profile with every precision key set to bfloat16 runs every stage of the pipeline on the CPU."""
    root, ran = bf16_repro
    assert set(ran) == set(ALL_STAGES) and len(ran) == len(ALL_STAGES)
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert all(params[section][key] == "bfloat16" for section, keys in BF16.items() for key in keys
               if key in ("precision", "dtype"))  # fmt: skip
    for out_path in ("metrics/steer.json", "metrics/recovery.json", "reports/index.html", "reports/table2.md",
                     "data/interp/categories/figure1.json", "models/lora-mlp-ablated/ablation.json"):  # fmt: skip
        assert (root / out_path).is_file(), out_path


def test_bfloat16_where_it_belongs_and_finite(bf16_repro):
    """The LoRA's own weights stay float32, the full finetune is saved in bf16, the activation stores hold
    finite, varying bf16 readings, and the SAE and ablation figures are finite."""
    import torch
    from safetensors import safe_open

    from lorascope.extract.store import Store

    root, _ = bf16_repro
    for rel, dtype in (
        ("models/lora/adapter_model.safetensors", "F32"),
        ("models/full/model.safetensors", "BF16"),
    ):
        with safe_open(str(root / rel), "pt") as f:
            names = f.keys()  # (a safe_open handle is not iterable)
            assert {f.get_slice(k).get_dtype() for k in names} == {dtype}, rel
    for source in ("lora", "mlp"):
        store = Store.open(root / "data/activations" / source)
        assert store.index["precision"] == "bfloat16" and store.index["dtype"] == "bfloat16"
        acts, _ = store.read(store.shards[0])
        assert acts.dtype == torch.bfloat16 and bool(torch.isfinite(acts.float()).all())
        assert float(acts.float().std()) > 0
    sae = json.loads((root / "metrics/sae.json").read_text())
    assert 0 < sae["fvu"] < 1
    assert math.isfinite(sae["kl_lora_spliced"]) and sae["kl_lora_base"] > 0
    groups = json.loads((root / "metrics/ablation/groups.json").read_text())
    assert all(math.isfinite(a["kl"]) and a["kl"] >= -1e-6 for a in groups["ablations"].values())
    assert groups["ablations"]["all"]["kl"] == pytest.approx(groups["reference"]["kl_lora_base"])
