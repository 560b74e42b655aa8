"""`lorascope seeds` end to end through a real git + DVC repository and DVC's real experiment queue, with a
stub pipeline in place of the ML one (which takes minutes per seed).

The repository holds the tiny profile's params.yaml and a dvc.yaml whose `recovery` stage runs
`make_outputs.py`: it writes every file `lorascope.seeds.results.read` reads, deterministic and
seed-dependent, and fails (exit 2, "error: planted failure ...") for seed 2. The `sae`, `steer` and
`categorize` stages only depend on it (the command checks the stages exist). Seed 1's SAE is seed 0's with
its latents permuted (the same adapter, statistics, labels and categories travelling with each latent), so
their features match one to one; seed 3's is random. What is checked: the queue runs the seeds, the failed
one is reported with its error and the others kept, each experiment's outputs are read back from its own
rev, no experiment writes into `LORASCOPE_ROOT`, the MLflow store is the repository's, and a run in which
no seed finishes exits 2 with one error line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.e2e.test_e2e import git_env, sh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TASKS = ("aime24_nofigures", "math500")
ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0)
LAYERS, KINDS = 2, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPONENTS = [f"L{layer}.{kind}" for layer in range(LAYERS) for kind in KINDS]
D_IN, D_SAE, RANK_IN = len(COMPONENTS), 28, 8
DEAD = (3, 11)
"""Seed 0's dead latents (seed 1's are the same latents, permuted)."""
FAILING = 2

OUTS = (
    "metrics/recovery.json",
    "metrics/sae.json",
    "metrics/steer.json",
    "models/lora/adapter_model.safetensors",
    "models/sae/cfg.json",
    "models/sae/sae.safetensors",
    "models/sae/alive.json",
    "data/contexts/lora.features.parquet",
    "data/interp/sae.parquet",
    "data/interp/categories/assignments.parquet",
)

MAKE_OUTPUTS = f'''\
"""The stub pipeline: every output `lorascope seeds` reads, for the seeds in params.yaml."""
import json
import sys

import numpy as np
import pandas as pd
import yaml
from safetensors.numpy import save_file

from lorascope.project import workspace_root

TASKS = {TASKS!r}
ALPHAS = {ALPHAS!r}
LAYERS, KINDS = {LAYERS!r}, {KINDS!r}
COMPONENTS = [f"L{{layer}}.{{kind}}" for layer in range(LAYERS) for kind in KINDS]
D_IN, D_SAE, RANK_IN = {D_IN}, {D_SAE}, {RANK_IN}
DEAD = {DEAD!r}

root = workspace_root()  # the experiment's own workspace, whatever LORASCOPE_ROOT says
params = yaml.safe_load((root / "params.yaml").read_text())
seeds = {{s: params[s]["seed"] for s in ("base", "finetune", "sae")}}
seed = seeds["sae"]
if len(set(seeds.values())) != 1:
    sys.exit(f"error: seeds differ: {{seeds}}")
if seed == {FAILING}:
    print(f"error: planted failure for seed {{seed}}", file=sys.stderr)
    sys.exit(2)


def write(rel, fn):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    fn(path)


def dump(rel, obj):
    write(rel, lambda p: p.write_text(json.dumps(obj, indent=1, sort_keys=True)))


def table(rel, rows):
    write(rel, lambda p: pd.DataFrame(rows).to_parquet(p, index=False))


# Table 1: scores that move with the seed
recovery = {{}}
for t, task in enumerate(TASKS):
    base, lora, full = 0.1 + seed / 100 + t / 10, 0.4 + seed / 20 + t / 10, 0.6 + seed / 25 + t / 10
    recovery[task] = {{
        "base": base, "lora": lora, "full": full, "recovery": (lora - base) / (full - base),
        "recovery.ci_low": 0.0, "recovery.ci_high": 1.0,
    }}
dump("metrics/recovery.json", {{"tasks": recovery}})
live = [i for i in range(D_SAE) if i not in DEAD]
dump("metrics/sae.json", {{
    "fvu": 0.1 + seed / 100, "fvu_normalised": 0.2 + seed / 100, "lora_effect_recovered": 0.8 - seed / 50,
    "l0_calibrated": 4.0, "alive_latents": len(live), "d_sae": D_SAE,
}})
dump("metrics/steer.json", {{
    "selectors": {{"label:Wait": "sae.1"}},
    "directions": {{"sae.1": {{
        f"{{a:g}}": {{"backtracks_per_1k": 1.0 + seed + (seed + 1) * a, "tokens": 96}} for a in ALPHAS
    }}}},
}})

# the adapter, the store's statistics, the SAE, labels and categories: seed 1 is seed 0's with its
# latents permuted; any other seed draws its own
rng = np.random.default_rng(0 if seed == 1 else seed)
A = {{c: rng.normal(size=(1, RANK_IN)).astype(np.float32) for c in COMPONENTS}}
B = {{c: rng.normal(size=(RANK_IN, 1)).astype(np.float32) for c in COMPONENTS}}
mean, std = rng.normal(size=D_IN), rng.uniform(0.5, 2.0, size=D_IN)
W = rng.normal(size=(D_SAE, D_IN)).astype(np.float32)
labels = [f"pattern {{i}}" for i in range(D_SAE)]
categories = [f"category {{i % 4}}" for i in range(D_SAE)]
perm = np.random.default_rng(100).permutation(D_SAE) if seed == 1 else np.arange(D_SAE)
W = W[perm]  # latent j of seed 1 is latent perm[j] of seed 0
live = sorted(int(j) for j in range(D_SAE) if int(perm[j]) in live)
labels, categories = [labels[p] for p in perm], [categories[p] for p in perm]

tensors = {{}}
for c in COMPONENTS:
    layer, kind = c[1:].split(".")
    block = "mlp" if kind in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    key = f"base_model.model.model.layers.{{layer}}.{{block}}.{{kind}}"
    tensors[f"{{key}}.lora_A.weight"], tensors[f"{{key}}.lora_B.weight"] = A[c], B[c]
write("models/lora/adapter_model.safetensors", lambda p: save_file(tensors, str(p)))
dump("models/sae/cfg.json", {{"components": COMPONENTS, "d_in": D_IN, "d_sae": D_SAE, "k": 4}})
write("models/sae/sae.safetensors", lambda p: save_file({{
    "W_dec_FD": W, "W_enc_DF": np.ascontiguousarray(W.T), "b_enc_F": np.zeros(D_SAE, np.float32),
    "b_dec_D": np.zeros(D_IN, np.float32),
}}, str(p)))
dump("models/sae/alive.json", {{"alive_latents": live, "d_sae": D_SAE}})
table("data/contexts/lora.features.parquet", [
    {{"feature": 2 * i + (sign < 0), "feature_name": c + ("+" if sign > 0 else "-"), "sign": sign,
      "mean": float(mean[i]), "std": float(std[i]), "count": 1000}}
    for i, c in enumerate(COMPONENTS) for sign in (1, -1)
])
table("data/interp/sae.parquet", [
    {{"feature": i, "feature_name": f"sae.{{i}}", "explanation": labels[i], "status": "ok"}} for i in live
])
table("data/interp/categories/assignments.parquet", [
    {{"source": "sae", "feature": i, "category": categories[i], "status": "ok"}} for i in live
])
'''


def stub_pipeline() -> dict:
    """dvc.yaml: `recovery` makes every output; `sae`, `steer` and `categorize` only follow it."""
    follow = {"cmd": 'python -c "pass"', "deps": ["metrics/recovery.json"]}
    return {
        "stages": {
            "recovery": {
                "cmd": "python make_outputs.py",
                "deps": ["make_outputs.py"],
                "params": ["base.seed", "finetune.seed", "sae.seed"],
                "outs": list(OUTS),
            },
            "sae": follow,
            "steer": follow,
            "categorize": follow,
        }
    }


def seeds_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed `lorascope seeds` in ``root``, with ``LORASCOPE_ROOT`` at it (queued experiments must
    still write into their own workspaces) and no MLflow store of the session (the repository's own)."""
    lorascope = str(Path(sys.executable).parent / "lorascope")
    env = {**git_env(), "LORASCOPE_ROOT": str(root)}
    return subprocess.run(
        [lorascope, "seeds", *args], cwd=root, env=env, capture_output=True, text=True, timeout=540
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = git_env()
    root = tmp_path_factory.mktemp("seeds") / "repo"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text(yaml.safe_dump(stub_pipeline(), sort_keys=False))
    (root / "make_outputs.py").write_text(MAKE_OUTPUTS)
    (root / ".gitignore").write_text("/mlflow.db\n/mlruns/\n/reports/\n__pycache__/\n")
    sh("git", "init", "-q", cwd=root, env=env)
    sh("dvc", "init", "-q", cwd=root, env=env)
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "stub pipeline", cwd=root, env=env)
    return root


@pytest.fixture(scope="module")
def ran(repo: Path) -> subprocess.CompletedProcess:
    """`lorascope seeds --seeds 0,1,2,3 -j 2`, once for the module."""
    yield seeds_cli(repo, "--seeds", "0,1,2,3", "-j", "2")
    sh("dvc", "queue", "stop", cwd=repo, env=git_env(), check=False)


def test_seeds_run_as_queued_experiments(repo: Path, ran: subprocess.CompletedProcess) -> None:
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    out = ran.stdout.strip()
    assert out.startswith("seeds: 3 of 4 seeds finished; failed: 2;"), out
    assert str(repo / "reports" / "seeds.md") in out
    # every experiment wrote into its own workspace, none into LORASCOPE_ROOT; one MLflow store, the repo's
    assert not (repo / "metrics" / "recovery.json").exists()
    assert not (repo / "models").exists() and not (repo / "data").exists()
    assert (repo / "mlflow.db").is_file()
    listed = sh("dvc", "exp", "list", "--name-only", cwd=repo, env=git_env()).stdout.split()
    assert sorted(listed) == ["seed-0", "seed-1", "seed-3"]


def test_the_report_keeps_the_finished_seeds_and_names_the_failed_one(
    repo: Path, ran: subprocess.CompletedProcess
) -> None:
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    report = json.loads((repo / "reports" / "seeds.json").read_text())
    assert report["seeds"] == [0, 1, 3]
    assert report["experiments"] == {"0": "seed-0", "1": "seed-1", "3": "seed-3"}
    assert report["triples"]["3"] == {"base": 3, "finetune": 3, "sae": 3}
    assert set(report["failed"]) == {"2"}
    assert "planted failure" in report["failed"]["2"], report["failed"]
    md = (repo / "reports" / "seeds.md").read_text()
    assert "**Failed seeds**: 2: " in md and "planted failure" in md
    assert "chance baseline" in md  # base.seed varies

    # each seed's effects are what its own experiment wrote
    per_seed = report["per_seed"]
    for seed in (0, 1, 3):
        e = per_seed[str(seed)]
        for t, task in enumerate(TASKS):
            base, lora, full = 0.1 + seed / 100 + t / 10, 0.4 + seed / 20 + t / 10, 0.6 + seed / 25 + t / 10
            assert e[f"{task}.base"] == pytest.approx(base)
            assert e[f"{task}.lora_gain"] == pytest.approx(lora - base)
            assert e[f"{task}.full_gain"] == pytest.approx(full - base)
            assert e[f"{task}.recovery"] == pytest.approx((lora - base) / (full - base))
            assert f"{task}.recovery.ci_low" not in e
        assert e["sae.fvu"] == pytest.approx(0.1 + seed / 100)
        assert e["sae.lora_effect_recovered"] == pytest.approx(0.8 - seed / 50)
        assert e["sae.alive_latents"] == D_SAE - len(DEAD)
        curve = [1.0 + seed + (seed + 1) * a for a in ALPHAS]
        assert report["steering"][str(seed)]["label:Wait"] == {
            "direction": "sae.1",
            "alphas": list(ALPHAS),
            "backtracks_per_1k": pytest.approx(curve),
        }
        assert e["steer.label:Wait.first"] == pytest.approx(curve[0])
        assert e["steer.label:Wait.last"] == pytest.approx(curve[-1])
        assert e["steer.label:Wait.rises"] == 1.0
    assert per_seed["3"]["aime24_nofigures.lora_gain"] == pytest.approx(0.55 - 0.13)
    gains = report["across_seeds"]["aime24_nofigures.lora_gain"]
    assert gains["n"] == 3
    assert gains["mean"] == pytest.approx(sum(0.3 + s / 20 - s / 100 for s in (0, 1, 3)) / 3)


def test_stability_across_the_experiments(ran: subprocess.CompletedProcess, repo: Path) -> None:
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    stab = json.loads((repo / "reports" / "seeds.json").read_text())["stability"]
    live = D_SAE - len(DEAD)
    features = {tuple(f["seeds"]): f for f in stab["features"]}
    assert set(features) == {(0, 1), (0, 3), (1, 3)}
    # seed 1's SAE is seed 0's, permuted: every live latent finds its own, labels and categories with it
    same = features[(0, 1)]
    assert same["live"] == [live, live]
    assert same["matched"] == live and same["share_matched"] == 1.0
    assert same["label_agreement"] == 1.0 and same["category_agreement"] == 1.0
    assert same["mean_best_cosine"] == pytest.approx(1.0, abs=1e-6)
    # seed 3's is another random SAE
    for pair in ((0, 3), (1, 3)):
        assert features[pair]["share_matched"] < 0.5, features[pair]
        assert features[pair]["mean_best_cosine"] < 0.9
    # the adapter's directions: one per component, three pairs each; seeds 0 and 1 share theirs
    assert list(stab["directions"]) == sorted(COMPONENTS, key=lambda c: (int(c[1:].split(".")[0]), c))
    for d in stab["directions"].values():
        assert d["A"]["n"] == d["B"]["n"] == 3
        assert d["A"]["max"] == pytest.approx(1.0, abs=1e-6)
        assert d["B"]["max"] == pytest.approx(1.0, abs=1e-6)
    assert stab["features_summary"]["share_matched"]["max"] == 1.0


def test_no_seed_finished_is_one_error_line(repo: Path, ran: subprocess.CompletedProcess) -> None:
    """Run after the module's queue (the same repository, with seed 2's failed task already in the queue)."""
    before = (repo / "reports" / "seeds.json").read_bytes()
    again = seeds_cli(repo, "--seeds", str(FAILING))
    assert again.returncode == 2, (again.stdout, again.stderr)
    assert (repo / "reports" / "seeds.json").read_bytes() == before  # the earlier report is kept
    *progress, last = again.stderr.strip().splitlines()
    # one error line, after the queue's progress bar (rich, on stderr)
    assert last.startswith("error:"), again.stderr
    assert all(line.startswith("seeds: 1 DVC experiment(s)") for line in progress), again.stderr
    assert "no seed finished" in last and "planted failure" in last, last
    assert not again.stdout.strip()
