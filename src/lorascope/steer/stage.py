"""Run the ``steer`` stage: for each direction, a sweep over alpha on a fixed prompt set.

Outputs in ``data/steer/``: ``generations.parquet`` (direction, alpha, task, row, question, output,
tokens, finished, backtracks, backtrack_pct_words, correct), ``summary.parquet`` (per direction and
alpha: typical magnitude, backtracking words per 1000 generated tokens, the paper author's backtracking
percentage (``generation.paper_backtrack_pct``, mean over prompts), mean length, accuracy);
``metrics/steer.json`` holds the summary for ``dvc metrics``, what each ``label:`` selector chose and, under
``unmatched``, the selectors no label matched (a finding about the labels: nothing is steered for them). The stage run is the
parent of one MLflow run per direction (its sweep) with the summary table and per-alpha metrics.

Each (direction, alpha) is saved to ``checkpoints/steer/`` when done, so a killed run resumes after the
last finished one; other params or inputs start over (``lorascope.resume``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorascope import paths
from lorascope.atomic import atomic_path, write_json
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.project import workspace_root

if TYPE_CHECKING:
    from lorascope.steer.directions import Direction
    from lorascope.steer.params import SteerSection

BASE = paths.BASE
ADAPTER = paths.LORA


def prompt_rows(params: Params) -> list[dict[str, Any]]:
    """The fixed prompt set: the first ``steer.limit`` rows with an answer of each task."""
    from lorascope.evaluate.benchmarks import question_rows

    cfg, ev = params.steer, params.evaluate
    return question_rows(cfg.tasks, cfg.limit, ev.data, ev.choice_seed, workspace_root(), "steer.tasks")


BACKTRACK_COUNTS = {
    "backtracks_per_1k": "whole-word, case-sensitive occurrences of backtrack_words per 1000 generated tokens "
    "(pooled over the prompts)",
    "backtrack_pct_words": "the paper author's count_patterns (jnward/reasoning_behavior_probes): per prompt, "
    "100 x case-insensitive occurrences of each backtrack word / whitespace-separated words of the generated "
    "text, summed over the words; mean over prompts",
}


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Backtracking (both counts: ``BACKTRACK_COUNTS``), mean length, accuracy, finished fraction."""
    tokens = sum(r["tokens"] for r in rows)
    return {
        "backtracks_per_1k": 1000 * sum(r["backtracks"] for r in rows) / max(tokens, 1),
        "backtrack_pct_words": sum(r["backtrack_pct_words"] for r in rows) / len(rows),
        "mean_tokens": tokens / len(rows),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "finished": sum(r["finished"] for r in rows) / len(rows),
        "generated_tokens": float(tokens),
    }


CHECKPOINT_VERSION = "v3"
"""Bumped when what a checkpointed (direction, alpha) holds changes (v2: text keeps the answer marker,
the paper's backtracking count; v3: s1's two phases, thinking then the forced answer)."""


def _key(direction: str, alpha: float) -> str:
    return f"{direction}@{alpha:g}"


def _directions(cfg: SteerSection, features: list[str], root: Path) -> tuple[list[Direction], dict[str, Any]]:
    """The directions to steer, resolved before the run (bad names fail here), and the ``label:``
    selectors no label matched (a finding: nothing is steered for them); one direction named twice is
    a one-line error."""
    from lorascope.autointerp.labels import NoLabelMatch
    from lorascope.steer.directions import resolve

    directions, unmatched = [], {}
    for name in cfg.directions:  # bad names fail before the run
        try:
            directions.append(resolve(name, features, root))
        except NoLabelMatch as err:
            unmatched[name] = err.finding
            print(f"steer: {err}: nothing steered for it (metrics/steer.json: unmatched)", file=sys.stderr)
    names = [d.name for d in directions]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        chosen = [d.selector or d.name for d in directions if d.name == dup]
        raise LorascopeError(
            f"steer.directions: {' and '.join(map(repr, chosen))} are both {dup}; list it once"
        )
    return directions, unmatched


def _inputs(params: Params, root: Path, directions: list[Direction]) -> list[Path]:
    """The run's DVC deps: the model, the LoRA features, the SAE when an SAE latent is steered, the
    label sets when a direction was chosen by label, and the tasks' local question files."""
    from lorascope.autointerp.labels import LABEL

    cfg = params.steer
    inputs = [root / BASE, root / ADAPTER, root / paths.features("lora")]
    if any(d.name.startswith("sae.") for d in directions):
        inputs += [root / paths.SAE, root / paths.features("sae")]
    if any(d.startswith(LABEL) for d in cfg.directions):  # chosen from the labels
        inputs += [root / paths.labels(s) for s in ("lora", "sae") if (root / paths.labels(s)).is_file()]
    inputs += sorted({root / params.evaluate.data[t] for t in cfg.tasks if t in params.evaluate.data})
    return inputs


def _generate(
    cfg: SteerSection,
    model: Any,
    tokenizer: Any,
    comps: list[Any],
    direction: Direction,
    alpha: float,
    rows: list[dict[str, Any]],
    prompts: list[str],
) -> list[dict[str, Any]]:
    """One generation row per prompt, steered along ``direction`` at ``alpha``, scored and counted."""
    from lorascope.chat import THINK
    from lorascope.evaluate.benchmarks import score
    from lorascope.generation import count_words, generate, paper_backtrack_pct
    from lorascope.steer.directions import steered

    with steered(model, comps, direction.offset(alpha)):
        outs = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, cfg.answer_tokens)
    done = []
    for r, g in zip(rows, outs, strict=True):
        s = score(r, THINK + g.text)
        done.append(
            {
                "direction": direction.name,
                "alpha": alpha,
                "task": r["task"],
                "row": r["row"],
                "question": r["question"],
                "gold": r["gold"],
                "output": g.text,
                "tokens": g.tokens,
                "finished": g.finished,
                "backtracks": count_words(g.text, cfg.backtrack_words),
                "backtrack_pct_words": paper_backtrack_pct(g.text, cfg.backtrack_words),
                "correct": bool(s["exact_match"]),
            }
        )
    return done


def _write_outputs(
    root: Path,
    cfg: SteerSection,
    generations: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    directions: list[Direction],
    unmatched: dict[str, Any],
    prompts: int,
) -> Path:
    """``data/steer/`` (generations and summary tables) and ``metrics/steer.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = root / paths.STEER
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        # pyarrow tables, not pandas': pandas records its own version in the file (other bytes per release)
        pq.write_table(pa.Table.from_pylist(generations), tmp / "generations.parquet")
        pq.write_table(pa.Table.from_pylist(summary), tmp / "summary.parquet")
    write_json(
        root / paths.STEER_METRICS,
        {
            "backtrack_words": cfg.backtrack_words,
            "backtrack_counts": BACKTRACK_COUNTS,
            "selectors": {d.selector: d.name for d in directions if d.selector},
            "unmatched": unmatched,
            "prompts": prompts,
            "directions": {
                d.name: {f"{s['alpha']:g}": {k: s[k] for k in ("backtracks_per_1k", "backtrack_pct_words", "mean_tokens", "accuracy")}
                         for s in summary if s["direction"] == d.name}
                for d in directions
            },
        },
    )  # fmt: skip
    return out


def _log_sweeps(
    cfg: SteerSection, directions: list[Direction], summary: list[dict[str, Any]], run_id: str
) -> None:
    """One nested MLflow run per direction: its sweep over alpha as per-step metrics and a table."""
    import mlflow
    import pandas as pd

    from lorascope.tracking import experiment_id

    for d in directions:
        with mlflow.start_run(
            experiment_id=experiment_id("steer"),
            run_name=d.name,
            nested=True,
            tags={"lorascope.stage": "steer", "steer.direction": d.name, "upstream.steer": run_id},
        ):
            sweep = [s for s in summary if s["direction"] == d.name]
            mlflow.log_params({"direction": d.name, "typical": d.typical, "alphas": cfg.alphas,
                               "selector": d.selector or ""})  # fmt: skip
            for step, point in enumerate(sweep):
                mlflow.log_metrics(
                    {k: float(v) for k, v in point.items() if k not in ("direction", "typical")},
                    step=step,
                )
            mlflow.log_table(pd.DataFrame(sweep), artifact_file="sweep.json")


def run(params: Params) -> Path:
    """Generate every (direction, alpha) and write ``data/steer/``; returns the folder."""
    import mlflow

    from lorascope.chat import chat_prompt
    from lorascope.components import feature_names, lora_components
    from lorascope.models import load_lora_model, load_tokenizer
    from lorascope.progress import track
    from lorascope.tracking import stage_run

    cfg, root = params.steer, workspace_root()
    if not cfg.directions:
        raise LorascopeError("steer.directions: empty; name at least one (L<layer>.<type> or sae.<latent>)")
    base_dir, adapter_dir = root / BASE, root / ADAPTER
    model = load_lora_model(base_dir, adapter_dir, cfg.precision, cfg.device, "steer")
    tokenizer = load_tokenizer(base_dir)
    comps = lora_components(model)
    features = feature_names(comps)
    directions, unmatched = _directions(cfg, features, root)
    rows = prompt_rows(params)
    prompts = [chat_prompt(tokenizer, r["prompt"]) for r in rows]
    inputs = _inputs(params, root, directions)

    with stage_run("steer", params, inputs) as sr:
        work = root / paths.checkpoints("steer")
        sr.claim(work)
        work.mkdir(parents=True, exist_ok=True)
        generations: list[dict[str, Any]] = []
        todo = [(d, a) for d in directions for a in cfg.alphas]
        for direction, alpha in track(todo, "steer", total=len(todo)):
            path = work / f"{_key(direction.name, alpha)}.{CHECKPOINT_VERSION}.json"
            if not path.is_file():
                write_json(path, _generate(cfg, model, tokenizer, comps, direction, alpha, rows, prompts))
            generations += json.loads(path.read_text())

        summary: list[dict[str, Any]] = []
        for d in directions:
            for a in cfg.alphas:
                matching = [g for g in generations if g["direction"] == d.name and g["alpha"] == a]
                summary.append({"direction": d.name, "alpha": a, "typical": d.typical, **summarize(matching)})
        out = _write_outputs(root, cfg, generations, summary, directions, unmatched, len(rows))
        mlflow.log_params({"prompts": len(rows)})
        _log_sweeps(cfg, directions, summary, sr.run_id)
        sr.log_outputs(out, root / paths.STEER_METRICS)
    return out
