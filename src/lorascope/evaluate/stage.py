"""Run the ``evaluate`` stage for one variant, and the recovery table over all variants.

``run`` evaluates one model variant on the configured benchmarks through lm-eval and writes
``metrics/eval/<variant>.json`` (per task: score, stderr, n, fallback answers, rows skipped) with its
``<variant>.run.json``; the per-question samples go to the MLflow run as tables. Generated answers
are kept in lm-eval's request cache under ``checkpoints/evaluate/``, keyed by the model and the
generation params, so a killed run resumes and a repeated one generates nothing.

``run_recovery`` reads every variant's metrics and writes ``metrics/recovery.json`` (Table 1, and the
ablated-adapter columns of Table 2) and ``metrics/recovery.md``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lorascope.atomic import write_json, write_text
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.evaluate import benchmarks
from lorascope.project import workspace_root

TASK_DIR = Path(__file__).with_name("tasks")
BASE = Path("models/base")


def metrics_path(variant: str) -> Path:
    return workspace_root() / "metrics" / "eval" / f"{variant}.json"


def recovery_path() -> Path:
    return workspace_root() / "metrics" / "recovery.json"


def _variant_dir(params: Params, variant: str) -> Path:
    variants = params.evaluate.variants
    if variant not in variants:
        raise LorascopeError(f"unknown variant {variant!r}; evaluate.variants has: {', '.join(variants)}")
    return workspace_root() / variants[variant].model


def _metadata(params: Params) -> dict[str, Any]:
    """Task metadata lm-eval hands to the dataset loaders: local files and the choice seed."""
    root, cfg = workspace_root(), params.evaluate
    return {
        benchmarks.DATA_KEY: {t: str(root / p) for t, p in cfg.data.items()},
        benchmarks.SEED_KEY: cfg.choice_seed,
    }


def _cache_prefix(params: Params, variant: str, model_digests: list[str]) -> Path:
    """lm-eval request-cache path: one per model content and generation params (not batch sizes,
    which do not change greedy answers), so a resumed run reuses only answers of the same model."""
    cfg = params.evaluate
    key = {
        "models": model_digests,
        "generation": cfg.model_dump(
            include={"backend", "dtype", "max_gen_toks", "thinking_tokens", "answer_tokens", "wait_extensions",
                     "wait_text", "choice_seed", "lora_serving"}
        ),
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return workspace_root() / "checkpoints" / "evaluate" / f"{variant}-{digest}" / "requests"


def _sample_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per question: prompt, output, extracted answer (and how), gold, correct."""
    from lorascope.evaluate.answers import extract

    rows = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        doc, output = s["doc"], s["resps"][0][0]
        got = extract(output, doc["kind"])
        rows.append(
            {
                "doc_id": s["doc_id"],
                "prompt": doc["prompt"],
                "output": output,
                "extracted": got.text,
                "method": got.method,
                "gold": doc["gold"],
                "correct": bool(s["exact_match"]),
            }
        )
    return rows


def run(params: Params, variant: str, tasks: list[str] | None = None) -> Path:
    """Evaluate ``variant`` on ``tasks`` (default: ``evaluate.tasks``); returns its metrics file."""
    import mlflow
    import pandas as pd
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lorascope.evaluate.backend import build, resolve
    from lorascope.tracking import stage_run

    cfg, root = params.evaluate, workspace_root()
    tasks = tasks or cfg.tasks
    for t in tasks:
        benchmarks.benchmark(t)
    base_dir, model_dir = root / BASE, _variant_dir(params, variant)
    spec = resolve(base_dir, model_dir)
    metadata = _metadata(params)
    local = [Path(metadata[benchmarks.DATA_KEY][t]) for t in tasks if t in cfg.data]
    counts = {t: benchmarks.counts(t, metadata) for t in tasks}  # loads every dataset: bad files fail here
    inputs = [base_dir, *([model_dir] if model_dir != base_dir else []), *local]

    with stage_run(
        "evaluate",
        params,
        inputs=inputs,
        run_name=variant,
        tags={"evaluate.variant": variant, "evaluate.backend": cfg.backend},
    ) as sr:
        cache = _cache_prefix(
            params, variant, [sr.inputs_md5[p] for p in inputs[:2]]
        )  # hashed once, by the run
        cache.parent.mkdir(parents=True, exist_ok=True)
        lm = build(cfg, spec, root / "checkpoints" / "evaluate" / "merged" / variant)
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=metadata),
            use_cache=str(cache),
            limit=cfg.limit,
            gen_kwargs={"max_gen_toks": cfg.max_gen_toks},
            log_samples=True,
            bootstrap_iters=cfg.bootstrap_iters,
            random_seed=cfg.seed,
        )
        per_task: dict[str, Any] = {}
        for t in tasks:
            res, samples = results["results"][t], results["samples"][t]
            rows = _sample_rows(samples)
            per_task[t] = {
                "score": res["exact_match,none"],
                "stderr": res.get("exact_match_stderr,none"),
                "n": len(rows),
                "fallback": sum(r["method"] == "fallback" for r in rows),
                "no_answer_extracted": sum(r["method"] == "none" for r in rows),
                **counts[t],
            }
            mlflow.log_metrics(
                {f"{t}.{k}": float(v) for k, v in per_task[t].items() if isinstance(v, (int, float))}
            )
            mlflow.log_table(pd.DataFrame(rows), artifact_file=f"samples/{t}.json")
        mlflow.log_metrics(
            {"generated_requests": lm.generated_requests, "generated_tokens": lm.generated_tokens}
        )
        out = metrics_path(variant)
        write_json(
            out,
            {
                "variant": variant,
                "model": cfg.variants[variant].model,
                "backend": cfg.backend,
                "run_id": sr.run_id,
                "generated_requests": lm.generated_requests,
                "tasks": per_task,
            },
        )
        sr.write_manifest(out.parent, {"variant": variant}, files=[out])
        mlflow.log_artifact(str(out))
    return out


def run_recovery(params: Params) -> Path:
    """Collect every variant's scores into ``metrics/recovery.json`` (and ``.md``)."""
    import mlflow

    from lorascope.evaluate.recovery import markdown, table
    from lorascope.tracking import stage_run

    cfg = params.evaluate
    paths = {v: metrics_path(v) for v in cfg.variants}
    present = {v: p for v, p in paths.items() if p.is_file()}
    if not present:
        raise LorascopeError(f"{paths['base'].parent if 'base' in paths else 'metrics/eval'}: no evaluation "
                             "metrics yet; run `lorascope evaluate --variant <name>` first")  # fmt: skip
    scores = {
        v: {t: r["score"] for t, r in json.loads(p.read_text())["tasks"].items()} for v, p in present.items()
    }
    rows = table(scores, cfg.tasks)
    missing = sorted(set(cfg.variants) - set(present))
    with stage_run("evaluate", params, inputs=list(present.values()), run_name="recovery") as sr:
        out = recovery_path()
        write_json(out, {"tasks": rows, "missing_variants": missing, "run_id": sr.run_id})
        write_text(out.with_suffix(".md"), markdown(rows, list(present)))
        sr.write_manifest(out.parent, files=[out, out.with_suffix(".md")])
        for task, row in rows.items():
            for k, v in row.items():
                if isinstance(v, float):
                    mlflow.log_metric(f"{task}.{k}", v)
        mlflow.log_artifact(str(out.with_suffix(".md")))
    return out
