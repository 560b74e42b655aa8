"""Evaluate-stage throughput: HF generation at batch size 1 vs the batched backend, and grading.

1. Builds a throw-away tiny workspace (random Qwen2 + synthetic prepared data), then generates
   answers for the same ``--questions`` MATH-style prompts through lorascope's HF backend (lm-eval
   HFLM + budget forcing, greedy, ``--thinking`` + ``--answer`` tokens each) once with batch size 1
   and once with ``--batch``, and prints generated tokens/s and the ratio (goal: >= 3x on CPU).
   Tokens are counted as the thinking budget counts them, by re-encoding each phase's decoded text
   (lm-eval returns text), which undercounts runs of newlines merged into one token; both batch
   sizes generate the same questions with the same budgets, so the ratio is unaffected.
2. Grades all 500 MATH500 gold answers (``../shared/data``) as s1-format model outputs: once
   against themselves (equal), once against a perturbed copy (not equal: the slow symbolic path),
   and prints answers/s for extraction + grading.

Usage: python benchmarks/evaluate_throughput.py [--questions 32] [--batch 16] [--thinking 48] [--answer 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATH500 = ROOT.parent / "shared" / "data" / "benchmarks" / "math500.jsonl"


def tiny_workspace(tmp: Path) -> Path:
    ws = tmp / "ws"
    ws.mkdir()
    (ws / "dvc.yaml").write_text("stages: {}\n")
    (ws / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = {**os.environ, "LORASCOPE_ROOT": str(ws), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    exe = Path(sys.executable).parent / "lorascope"
    for stage in ("base", "prepare"):
        subprocess.run([str(exe), stage], cwd=ws, env=env, check=True, capture_output=True)
    return ws


def generation(ws: Path, questions: int, batch: int, thinking: int, answer: int) -> dict[str, float]:
    """Generated tokens/s through the forced HF backend at batch size ``batch``."""
    from lorascope.evaluate.backend import build, resolve
    from lorascope.evaluate.params import EvaluateSection
    from lorascope.prepare import synthetic

    cfg = EvaluateSection(
        batch_size=batch, max_gen_toks=thinking + answer, thinking_tokens=thinking, answer_tokens=answer,
        chunk_size=questions, dtype="float32",
    )  # fmt: skip
    spec = resolve(ws / "models/base", ws / "models/base")
    lm = build(cfg, spec, ws / "merged")
    users = [str(r["problem"]) for r in synthetic.math_rows(questions, seed=1)]
    lm.generate_questions(users[:batch])  # warm-up: allocator, kernels
    before = lm.generated_tokens
    t0 = time.perf_counter()
    lm.generate_questions(users)
    wall = time.perf_counter() - t0
    tokens = lm.generated_tokens - before
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def grading() -> dict[str, float]:
    """answers/s of extract + grade on the 500 MATH500 golds, equal and perturbed."""
    from lorascope.chat import ANSWER, THINK
    from lorascope.evaluate.answers import extract
    from lorascope.evaluate.grading import grade

    golds = [json.loads(line)["answer"] for line in MATH500.read_text().splitlines()]

    def output(ans: str) -> str:
        return f"{THINK}Let me work it out.\n{ANSWER}Answer: \\boxed{{{ans}}}"

    def perturb(ans: str) -> str:  # change the first digit, or append one
        for i, c in enumerate(ans):
            if c.isdigit():
                return ans[:i] + str((int(c) + 1) % 10) + ans[i + 1 :]
        return ans + "1"

    res: dict[str, float] = {}
    for name, preds in (("equal", golds), ("perturbed", [perturb(g) for g in golds])):
        t0 = time.perf_counter()
        correct = sum(
            grade("latex", g, extract(output(p), "latex").text) for g, p in zip(golds, preds, strict=True)
        )
        wall = time.perf_counter() - t0
        res[f"{name}_answers_per_s"] = len(golds) / wall
        res[f"{name}_correct"] = correct
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--thinking", type=int, default=48)
    p.add_argument("--answer", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        ws = tiny_workspace(Path(tmp))
        os.environ["LORASCOPE_ROOT"] = str(ws)
        one = generation(ws, args.questions, 1, args.thinking, args.answer)
        many = generation(ws, args.questions, args.batch, args.thinking, args.answer)
    print(f"generation: {args.questions} questions x {args.thinking}+{args.answer} tokens, tiny Qwen2, "
          f"torch threads {args.threads}")  # fmt: skip
    print(
        f"  batch 1          {one['tokens_per_s']:8.1f} tokens/s  ({one['tokens']} tokens, {one['wall_s']:.1f} s)"
    )
    print(
        f"  batch {args.batch:<10d} {many['tokens_per_s']:8.1f} tokens/s  ({many['tokens']} tokens, {many['wall_s']:.1f} s)"
    )
    print(f"  ratio            {many['tokens_per_s'] / one['tokens_per_s']:8.2f}x  (goal >= 3x)")
    if MATH500.is_file():
        g = grading()
        print("grading: 500 MATH500 golds as s1 outputs, extract + grade")
        print(
            f"  gold vs gold       {g['equal_answers_per_s']:8.1f} answers/s  ({g['equal_correct']}/500 correct)"
        )
        print(
            f"  gold vs perturbed  {g['perturbed_answers_per_s']:8.1f} answers/s  ({g['perturbed_correct']}/500 correct)"
        )
    else:
        print(f"grading: skipped ({MATH500} not found)")


if __name__ == "__main__":
    main()
