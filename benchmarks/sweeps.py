"""Sweep throughput: trials per minute of a tiny-profile LoRA study with 1 and with 2 processes.

Builds a throw-away workspace (tiny base model + synthetic prepared data), then runs the same
journal-storage study (``--trials`` LoRA trials of ``--max-steps`` optimizer steps each) once with
one ``lorascope sweep lora`` process and once with two processes joining the study, and prints
trials/minute and the ratio (on a 2-core machine expect at most 2x).

Usage: python benchmarks/sweeps.py [--trials 8] [--max-steps 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / "lorascope"


def workspace(tmp: Path) -> Path:
    ws = tmp / "ws"
    ws.mkdir()
    (ws / "dvc.yaml").write_text("stages: {}\n")
    shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
    env = {**os.environ, "LORASCOPE_ROOT": str(ws), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    for stage in ("base", "prepare"):
        subprocess.run([str(EXE), stage], cwd=ws, env=env, check=True, capture_output=True)
    return ws


def run_study(ws: Path, tmp: Path, name: str, space: Path, processes: int, threads: int) -> float:
    env = {
        **os.environ,
        "LORASCOPE_ROOT": str(ws),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "OMP_NUM_THREADS": str(threads),
    }
    cmd = [str(EXE), "sweep", "lora", "--study", name, "--storage", f"journal:{tmp / 'journal.log'}",
           "--space", str(space)]  # fmt: skip
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(processes)]  # fmt: skip
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"sweep process failed:\n{err[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ws = workspace(tmp)
        space = tmp / "space.yaml"
        space.write_text(
            yaml.safe_dump(
                {
                    "target": "lora",
                    "objectives": ["heldout_loss"],
                    "n_trials": args.trials,
                    "pruner": {"type": "none"},
                    "fixed": {
                        "finetune": {
                            "max_steps": args.max_steps,
                            "checkpoint_steps": args.max_steps,
                            "global_batch_size": 4,
                            "micro_batch_size": 2,
                        }
                    },  # fmt: skip
                    "params": {
                        "finetune.lora.r": {"choices": [1, 2, 4, 8, 16]},
                        "finetune.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                    },
                }
            )
        )
        print(
            f"{args.trials} tiny LoRA trials of {args.max_steps} steps, {args.threads} thread(s) per process, {os.cpu_count()} CPUs"
        )
        rates = {}
        for n in (1, 2):
            seconds = run_study(ws, tmp, f"bench-{n}", space, n, args.threads)
            rates[n] = args.trials / seconds * 60
            print(f"{n} process(es): {seconds:6.1f} s  {rates[n]:5.1f} trials/min")
        print(f"2 / 1 processes: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
