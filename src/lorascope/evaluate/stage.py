"""Run the ``evaluate`` stage for one variant, and the recovery table over all variants.

``run`` evaluates one model variant on the configured benchmarks through lm-eval, once greedily or
``evaluate.samples`` times sampled, and writes ``metrics/eval/<variant>.json`` (per task: score with
its bootstrap 95% CI, pass@k when sampled, n, fallback answers, rows skipped) and the per-question
correctness ``metrics/eval/<variant>.questions.json`` (kept out of the metrics file, for the paired
bootstrap of the recovery CIs); the per-question samples go to the MLflow run as tables. Generated
answers are kept in lm-eval's request cache under ``checkpoints/evaluate/``, keyed by the model and
the generation params, so a killed run resumes and a repeated one generates nothing.

``run_recovery`` reads every variant's metrics and writes ``metrics/recovery.json`` (Table 1, and the
ablated-adapter columns of Table 2, each recovery naming its reference, with a paired bootstrap CI)
and ``metrics/recovery.md``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorascope import paths
from lorascope.atomic import write_json, write_text
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.evaluate import benchmarks
from lorascope.project import workspace_root

if TYPE_CHECKING:
    from lorascope.evaluate.params import EvaluateSection
    from lorascope.tracking import StageRun

TASK_DIR = Path(__file__).with_name("tasks")
BASE = paths.BASE


def metrics_path(variant: str) -> Path:
    return workspace_root() / paths.eval_scores(variant)


def questions_path(variant: str) -> Path:
    """Per-question correctness of ``variant`` (a plain output next to its metrics)."""
    return workspace_root() / paths.eval_questions(variant)


def recovery_path() -> Path:
    return workspace_root() / paths.RECOVERY


def _variant_dir(params: Params, variant: str) -> Path:
    variants = params.evaluate.variants
    if variant not in variants:
        raise LorascopeError(f"unknown variant {variant!r}; evaluate.variants has: {', '.join(variants)}")
    return workspace_root() / variants[variant].model


def _metadata(params: Params) -> dict[str, Any]:
    """Task metadata lm-eval hands to the dataset loaders: local files, the choice seed and the
    instructions appended to prompts."""
    root, cfg = workspace_root(), params.evaluate
    return {
        benchmarks.DATA_KEY: {t: str(root / p) for t, p in cfg.data.items()},
        benchmarks.SEED_KEY: cfg.choice_seed,
        benchmarks.INSTRUCTIONS_KEY: dict(cfg.instructions),
    }


def _log_benchmarks(loaded: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Each benchmark's rows (``loaded``: task -> ``benchmarks.load``'s) as the run's input datasets (the
    runs table's Dataset column): the local file where ``evaluate.data`` names one, else the hub dataset."""
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    from lorascope.tracking import local_source, log_dataset

    for task, rows in loaded.items():
        b, local = benchmarks.benchmark(task), metadata[benchmarks.DATA_KEY].get(task)
        src = (
            local_source(local)
            if local
            else HuggingFaceDatasetSource(b.hub_path, b.hub_name, split=b.hub_split)
        )
        log_dataset(rows.to_pandas().astype(str), src, task, "evaluation")


def _cache_prefix(params: Params, variant: str, model_digests: list[str]) -> Path:
    """lm-eval request-cache path: one per model content and generation params, so a resumed run
    reuses only answers of the same model. Batch and chunk sizes change no answer (a sampled phase is
    seeded per question) and are left out. The sample count is not in either: each sample is its own
    request, so raising ``samples`` reuses the samples already drawn."""
    cfg = params.evaluate
    fields = {"backend", "dtype", "max_gen_toks", "thinking_tokens", "answer_tokens", "wait_extensions",
              "wait_text", "choice_seed", "lora_serving", "instructions"}  # fmt: skip
    if cfg.samples:
        fields |= {"temperature", "seed"}
    key = {
        "models": model_digests,
        "format": cfg.variants[variant].format,
        "generation": cfg.model_dump(include=fields),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return workspace_root() / paths.checkpoints("evaluate") / f"{variant}-{digest}" / "requests"


def _sample_rows(samples: list[dict[str, Any]], sample: int | None = None) -> list[dict[str, Any]]:
    """One row per question (of decode ``sample``; None: greedy): question id, prompt, output,
    extracted answer (and how), gold, correct."""
    from lorascope.evaluate.answers import extract

    rows = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        doc, output = s["doc"], s["resps"][0][0]
        got = extract(output, doc["kind"])
        rows.append(
            {
                "doc_id": s["doc_id"],
                "sample": sample,
                "qid": doc["qid"],
                "prompt": doc["prompt"],
                "output": output,
                "extracted": got.text,
                "method": got.method,
                "gold": doc["gold"],
                "correct": bool(s["exact_match"]),
            }
        )
    return rows


def _correctness(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[int]]]:
    """Question ids (in dataset order) and each question's 0/1 correctness per decode."""
    by_q: dict[str, list[int]] = {}
    order = sorted(rows, key=lambda r: (r["doc_id"], -1 if r["sample"] is None else r["sample"]))
    for r in order:
        by_q.setdefault(r["qid"], []).append(int(r["correct"]))
    return list(by_q), list(by_q.values())


def _generate(
    lm: Any, cfg: EvaluateSection, tasks: list[str], metadata: dict[str, Any], cache: Path
) -> dict[str, list[dict[str, Any]]]:
    """Every task's sample rows, one lm-eval pass per decode (greedy, or each of ``evaluate.samples``):
    each sample is its own request in the cache, so a resumed run generates only what is missing."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lorascope.evaluate.forcing import SAMPLE_KEY

    decodes: list[int | None] = list(range(cfg.samples)) if cfg.samples else [None]
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in tasks}
    for sample in decodes:  # one pass per decode: each sample is its own request in the cache
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=metadata),
            use_cache=str(cache),
            limit=cfg.limit,
            gen_kwargs={
                "max_gen_toks": cfg.max_gen_toks,
                **({} if sample is None else {SAMPLE_KEY: sample}),
            },
            log_samples=True,
            bootstrap_iters=0,  # the CIs are lorascope's own bootstrap over questions
            random_seed=cfg.seed,
        )
        for t in tasks:
            rows[t] += _sample_rows(results["samples"][t], sample)
    return rows


def _score(
    cfg: EvaluateSection, rows: dict[str, list[dict[str, Any]]], counts: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per task: the summary (score with its bootstrap CI, pass@k, fallback and missing answers, rows
    counted) and the per-question correctness; each task's metrics and samples go to the run."""
    import mlflow
    import pandas as pd

    from lorascope.evaluate.uncertainty import task_summary

    per_task: dict[str, Any] = {}
    questions: dict[str, Any] = {}
    for t, task_rows in rows.items():
        ids, correct = _correctness(task_rows)
        questions[t] = {"ids": ids, "correct": correct}
        per_task[t] = {
            **task_summary(correct, cfg.bootstrap_iters, cfg.seed, t),
            "fallback": sum(r["method"] == "fallback" for r in task_rows),
            "no_answer_extracted": sum(r["method"] == "none" for r in task_rows),
            **counts[t],
        }
        mlflow.log_metrics(  # MLflow names take no "@": pass@4 is logged as pass_at_4
            {
                f"{t}.{k}".replace("@", "_at_"): float(v)
                for k, v in per_task[t].items()
                if isinstance(v, (int, float))
            }
        )
        mlflow.log_table(pd.DataFrame(task_rows), artifact_file=f"samples/{t}.json")
    return per_task, questions


def _write_outputs(
    run: StageRun, cfg: EvaluateSection, variant: str, per_task: dict[str, Any], questions: dict[str, Any]
) -> Path:
    """``metrics/eval/<variant>.questions.json`` (compact: the paired bootstrap's input) and
    ``metrics/eval/<variant>.json``, each tagged on the run as it lands."""
    import mlflow

    decoding = {
        "samples": cfg.samples,
        "temperature": cfg.temperature if cfg.samples else 0.0,
        "format": cfg.variants[variant].format,
    }
    qpath = questions_path(variant)
    write_text(qpath, json.dumps({"variant": variant, **decoding, "tasks": questions}, sort_keys=True,
                                 separators=(",", ":")) + "\n")  # fmt: skip
    run.log_outputs(qpath)
    out = metrics_path(variant)
    write_json(
        out,
        {
            "variant": variant,
            "model": cfg.variants[variant].model,
            "backend": cfg.backend,
            "decoding": decoding,
            "tasks": per_task,
        },
    )
    mlflow.log_artifact(str(out))
    run.log_outputs(out)
    return out


def run(params: Params, variant: str, tasks: list[str] | None = None) -> Path:
    """Evaluate ``variant`` on ``tasks`` (default: ``evaluate.tasks``); returns its metrics file."""
    import mlflow

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
    loaded = {t: benchmarks.load(t, metadata) for t in tasks}  # every dataset: bad files fail here
    counts = {t: benchmarks.counts(t, rows) for t, rows in loaded.items()}
    inputs = [base_dir, *([model_dir] if model_dir != base_dir else []), *local]

    with stage_run(
        "evaluate",
        params,
        inputs=inputs,
        run_name=variant,
        tags={"evaluate.variant": variant, "evaluate.backend": cfg.backend},
    ) as sr:
        _log_benchmarks(loaded, metadata)
        cache = _cache_prefix(
            params, variant, [sr.inputs_md5[p] for p in inputs[:2]]
        )  # hashed once, by the run
        cache.parent.mkdir(parents=True, exist_ok=True)
        lm = build(
            cfg, spec, root / paths.checkpoints("evaluate") / "merged" / variant, cfg.variants[variant].format
        )
        rows = _generate(lm, cfg, tasks, metadata, cache)
        per_task, questions = _score(cfg, rows, counts)
        mlflow.log_metrics(
            {"generated_requests": lm.generated_requests, "generated_tokens": lm.generated_tokens}
        )
        return _write_outputs(sr, cfg, variant, per_task, questions)


def _per_question(variant: str) -> dict[str, dict[str, float]]:
    """``{task: {question id: mean correctness over its decodes}}`` of ``variant``."""
    data = json.loads(questions_path(variant).read_text())
    return {
        t: {q: sum(c) / len(c) for q, c in zip(d["ids"], d["correct"], strict=True)}
        for t, d in data["tasks"].items()
    }


def run_recovery(params: Params) -> Path:
    """Collect every variant's scores into ``metrics/recovery.json`` (and ``.md``): each recovery
    column with its reference and a paired bootstrap CI from the per-question results."""
    import mlflow

    from lorascope.evaluate.recovery import formulas, markdown, reference_map, table
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
    per_question = {v: _per_question(v) for v in present if questions_path(v).is_file()}
    variants = list(cfg.variants)
    references = {v: c.reference for v, c in cfg.variants.items()}
    rows = table(scores, cfg.tasks, variants, references, per_question, cfg.bootstrap_iters, cfg.seed)
    missing = sorted(set(cfg.variants) - set(present))
    refs = {
        ("recovery" if v == "lora" else f"recovery.{v}"): r
        for v, r in reference_map(variants, references).items()
    }
    inputs = [*present.values(), *(questions_path(v) for v in per_question)]
    with stage_run("evaluate", params, inputs=inputs, run_name="recovery") as sr:
        out = recovery_path()
        write_json(out, {"tasks": rows, "missing_variants": missing, "references": refs})
        write_text(out.with_suffix(".md"), markdown(rows, variants, formulas(variants, references)))
        sr.log_outputs(out, out.with_suffix(".md"))
        for task, row in rows.items():
            for k, v in row.items():
                if isinstance(v, float):
                    mlflow.log_metric(f"{task}.{k}", v)
        mlflow.log_artifact(str(out.with_suffix(".md")))
    return out
