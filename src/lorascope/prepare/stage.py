"""Run the ``prepare`` stage: load, format as s1, tokenize, validate, write ``data/prepared/``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lorascope import paths
from lorascope.atomic import atomic_path, write_json
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.progress import track
from lorascope.project import workspace_root
from lorascope.tracking import local_source, log_dataset, stage_run

OUT = paths.PREPARED
METRICS = paths.PREPARE_METRICS
BASE = paths.BASE
KEEP = ("id", "question", "solution", "cot_type", "source_type")
"""Source columns carried into ``train.parquet`` next to the token columns."""


def _text(value: Any) -> Any:
    # Nulls format as empty text; the validation suite reports them against the original column.
    return "" if value is None or (isinstance(value, float) and value != value) else value


def _encode_all(df: Any, tokenizer: Any, block_size: int) -> list[Any]:
    from lorascope.prepare.formatting import encode

    return [
        encode(tokenizer, _text(q), _text(t), _text(a), block_size)
        for q, t, a in track(
            zip(df["question"], df["deepseek_thinking_trajectory"], df["deepseek_attempt"], strict=True),
            description="prepare: tokenizing",
            total=len(df),
        )
    ]


def _write_train(directory: Path, df: Any, encoded: list[Any]) -> None:
    import pyarrow as pa

    from lorascope.prepare import table

    columns: dict[str, Any] = {
        c: pa.array(df[c].astype(str).tolist(), pa.string()) for c in KEEP if c in df.columns
    }
    columns["text"] = pa.array([e.text for e in encoded], pa.string())
    columns["input_ids"] = pa.array([e.input_ids for e in encoded], pa.list_(pa.int32()))
    columns["loss_start"] = pa.array([e.loss_start for e in encoded], pa.int32())
    columns["n_tokens"] = pa.array([len(e.input_ids) for e in encoded], pa.int32())
    columns["n_tokens_full"] = pa.array([e.n_tokens_full for e in encoded], pa.int32())
    table.write(directory, pa.table(columns))


def _write_eval(directory: Path, params: Params) -> dict[str, int]:
    """Held-out synthetic rows in the three benchmark shapes, in the benchmarks' own file formats."""
    import json

    from lorascope import organism
    from lorascope.prepare import synthetic

    cfg = params.prepare.synthetic
    n, seed = cfg.n_eval, cfg.seed
    generator = organism if cfg.family == "organism" else synthetic
    directory.mkdir(parents=True)
    for name, rows in (
        ("aime.jsonl", generator.aime_rows(n, seed)),
        ("math.jsonl", generator.math_rows(n, seed)),
    ):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with (directory / "gpqa.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=synthetic.GPQA_COLUMNS)
        writer.writeheader()
        writer.writerows(generator.gpqa_rows(n, seed))
    return {"eval_rows_integer": n, "eval_rows_latex": n, "eval_rows_choice": n}


def _log_dataset(df: Any, source: Any) -> None:
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    from lorascope.prepare.sources import REQUIRED

    if source.kind == "hub":
        src: Any = HuggingFaceDatasetSource(
            path=source.uri, split=source.details["split"], revision=source.details["revision"]
        )
    elif source.kind == "synthetic":
        src = CodeDatasetSource(
            tags={
                "generator": "lorascope.prepare.synthetic",
                **{k: str(v) for k, v in source.details.items()},
            }
        )
    else:
        src = local_source(source.uri)
    name = Path(source.uri).stem if source.kind == "local" else source.uri
    log_dataset(df[["id", *REQUIRED]].astype(str), src, name, "training")


def run(params: Params) -> Path:
    """Write ``data/prepared/`` (train.parquet, validation.json, eval/) and the stats metrics."""
    import mlflow

    from lorascope.models import load_tokenizer
    from lorascope.prepare.sources import load_rows
    from lorascope.prepare.validation import TEXT_COLUMNS, validate

    root, cfg = workspace_root(), params.prepare
    out, base_dir = root / OUT, root / BASE
    inputs = [base_dir, *([cfg.local_file] if cfg.local_file else [])]
    if cfg.local_file and not cfg.local_file.is_file():
        raise LorascopeError(f"{cfg.local_file}: dataset file not found (prepare.source)")
    if not base_dir.is_dir():
        raise LorascopeError(f"{base_dir}: no base model; run `lorascope base` (or `dvc repro`) first")

    with stage_run("prepare", params, inputs=inputs) as run:
        df, source = load_rows(cfg)
        tokenizer = load_tokenizer(base_dir)
        encoded = _encode_all(df, tokenizer, cfg.block_size)
        checks = df[["id", *TEXT_COLUMNS]].copy()
        checks["n_tokens_full"] = [e.n_tokens_full for e in encoded]
        checks["n_loss_tokens"] = [e.n_loss_tokens for e in encoded]
        ok, report, failures = validate(checks, cfg)
        mlflow.log_dict(report, "validation.json")
        _log_dataset(df, source)
        if not ok:
            raise LorascopeError(
                f"prepare: {len(failures)} expectation(s) failed on {source.uri}:\n"
                + "\n".join(f"  - {f}" for f in failures)
            )

        n_tokens = [len(e.input_ids) for e in encoded]
        truncated = sum(e.n_tokens_full > cfg.block_size for e in encoded)
        stats: dict[str, float] = {
            "rows": len(df),
            "tokens_total": sum(n_tokens),
            "tokens_mean": sum(n_tokens) / len(n_tokens),
            "tokens_max": max(n_tokens),
            "loss_tokens_total": sum(e.n_loss_tokens for e in encoded),
            "truncated_rows": truncated,
            "truncated_fraction": truncated / len(df),
        }
        with atomic_path(out) as tmp:
            tmp.mkdir()
            _write_train(tmp, df, encoded)
            write_json(tmp / "validation.json", report)
            stats.update(_write_eval(tmp / "eval", params))
        write_json(root / METRICS, stats)
        mlflow.log_metrics({k: float(v) for k, v in stats.items()})
        mlflow.log_dict({"kind": source.kind, "uri": source.uri, **source.details}, "source.json")
        run.log_outputs(out, root / METRICS)
    return out
