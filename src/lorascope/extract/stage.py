"""Run the ``extract`` stage for one source (``lora`` or ``mlp``) into ``data/activations/<source>/``.

The shard plan is fixed by the document lengths, so work is split by shard: under ``accelerate
launch`` process r extracts shards r, r + world, ... Shards are written into
``checkpoints/extract/<source>/`` (atomically); a re-run with the same inputs and params skips the
complete ones. When every shard is there, rank 0 writes the outlier record (``outliers.json``: per
component the max / median |activation| and the tokens over ``extract.outlier_ratio`` x median, see
``lorascope.extract.outliers``), then ``index.json`` (with the tokenizer's special token ids, which the
``exclude`` policies of later stages read), and moves the directory into place.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lorascope import paths, resume
from lorascope.atomic import write_json
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.extract.store import Shard, plan_shards, shard_complete, write_index, write_shard
from lorascope.project import workspace_root

if TYPE_CHECKING:
    from lorascope.extract.extractor import Extractor
    from lorascope.extract.params import ExtractSection
    from lorascope.tracking import StageRun

Source = Literal["lora", "mlp"]
PREPARED = paths.PREPARED
BASE = paths.BASE
ADAPTER = paths.LORA


def store_dir(source: str) -> Path:
    """``data/activations/<source>/`` at the workspace root."""
    return workspace_root() / paths.activations(source)


def work_dir(source: str) -> Path:
    """Where shards accumulate until the store is complete."""
    return workspace_root() / paths.checkpoints("extract") / source


def read_documents(prepared: Path) -> tuple[list[str], list[list[int]]]:
    """Row ids and token ids of the prepared training set, in order."""
    from lorascope.prepare import table as prepared_table

    table = prepared_table.read(prepared, ["id", "input_ids"])
    ids, docs = table.column("id").to_pylist(), table.column("input_ids").to_pylist()
    if not docs or not any(docs):
        raise LorascopeError(f"{prepared_table.path(prepared)}: no tokens to extract (empty dataset)")
    return ids, docs


def special_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's special tokens (the chat template's ``<|im_start|>``, ``<|im_end|>``, ...):
    what ``exclude.special_tokens`` leaves out downstream."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted(set(tokenizer.all_special_ids) | {int(i) for i, t in added.items() if t.special})


def _prepare_work(work: Path, run: StageRun, source: str) -> None:
    """Keep complete shards of the same run; start over when params or inputs changed."""
    run.claim(work, source=source)
    work.mkdir(parents=True, exist_ok=True)
    for stray in work.glob(".*.tmp*"):  # temp files of a killed writer
        shutil.rmtree(stray) if stray.is_dir() else stray.unlink()


def _load_extractor(
    cfg: ExtractSection, source: str, root: Path, docs: list[list[int]], state: Any
) -> Extractor:
    """The model ready to record ``source`` on this process's device; the merged path is checked on the
    first ``merge_check_tokens`` (rank 0 prints what the check measured)."""
    from lorascope.extract.extractor import Extractor
    from lorascope.extract.merge_check import MergeCheck, check_tokens

    extractor = Extractor.load(
        source,
        cfg.method,
        root / BASE,
        root / ADAPTER if source == "lora" else None,
        cfg.precision,
        state.device,
        cfg.mlp_neurons,
        MergeCheck(
            check_tokens(docs, cfg.merge_check_tokens),
            cfg.batch_tokens,
            cfg.merge_max_relative_error,
            cfg.merge_max_kl_fraction,
        ),
    )
    if extractor.merge_report is not None and state.is_main_process:
        print(f"extract: {extractor.merge_report.summary()}", file=sys.stderr, flush=True)
    return extractor


def _extract_shards(
    extractor: Extractor,
    shards: Iterable[Shard],
    docs: list[list[int]],
    work: Path,
    cfg: ExtractSection,
    on_shard: Callable[[Shard], None] | None,
) -> int:
    """Record and write each of this process's ``shards`` (atomically: a killed run leaves whole
    shards only); returns the tokens extracted."""
    extracted = 0
    for shard in shards:
        acts_TC, ids_T = extractor.run(docs[shard.first_doc : shard.last_doc], cfg.batch_tokens, cfg.dtype)
        write_shard(work / shard.file, acts_TC, ids_T)
        extracted += shard.tokens
        if on_shard is not None:
            on_shard(shard)
    return extracted


def _index(
    source: str,
    cfg: ExtractSection,
    extractor: Extractor,
    base_dir: Path,
    doc_ids: list[str],
    docs: list[list[int]],
    plan: list[Shard],
    tokenizer: Any,
) -> dict[str, Any]:
    """``index.json``: what the store holds (source, model, method, dtypes, components), where each
    document and shard starts, and the tokenizer's special token ids."""
    from lorascope.devices import dtype_name, resolve
    from lorascope.models import model_name

    starts = [0]
    for d in docs:
        starts.append(starts[-1] + len(d))
    return {
        "source": source,
        "model": model_name(base_dir),
        "adapter": ADAPTER.as_posix() if source == "lora" else None,
        "method": extractor.method,
        "precision": dtype_name(resolve(extractor.device, cfg.precision, "extract")[1]),
        "components": extractor.names,
        "modules": [
            {"layer": c.layer, "kind": c.kind, "module": c.module, "width": c.width}
            for c in extractor.components
        ],
        "dtype": cfg.dtype,
        "tokens": starts[-1],
        "documents": [[d, s, len(t)] for d, s, t in zip(doc_ids, starts[:-1], docs, strict=True)],
        "shards": [s.to_json() for s in plan],
        "special_token_ids": special_token_ids(tokenizer),
    }


def _write_index(
    work: Path, index: dict[str, Any], cfg: ExtractSection, tokenizer: Any, device: Any
) -> dict[str, Any]:
    """Write the outlier record, then ``index.json`` (whose presence marks a finished store); returns
    the record."""
    from lorascope.extract import outliers
    from lorascope.extract.store import FORMAT, Store

    record = outliers.record(  # before the index, whose presence marks a finished store
        Store(work, {"format": FORMAT, **index}),
        cfg.outlier_ratio,
        tokenizer.convert_ids_to_tokens,
        device,
    )
    write_json(work / outliers.FILE, record)
    write_index(work, index)
    return record


def _log_run(
    index: dict[str, Any],
    record: dict[str, Any],
    extractor: Extractor,
    plan: list[Shard],
    work: Path,
    resumed: int,
    processes: int,
    tokens_per_second: float | None,
) -> None:
    """The run's params (the dtype and method used) and metrics: the store's size, shards resumed,
    rank 0's throughput, the merge check's and the outliers' measurements."""
    import mlflow

    from lorascope.extract import outliers

    metrics = {
        "tokens": float(index["tokens"]),
        "documents": float(len(index["documents"])),
        "components": float(len(index["components"])),
        "shards": float(len(plan)),
        "shards_resumed": float(resumed),
        "processes": float(processes),
        "store_bytes": float(sum((work / s.file).stat().st_size for s in plan)),
    }
    if tokens_per_second is not None:
        metrics["tokens_per_second_rank0"] = tokens_per_second
    mlflow.log_params(
        {"source": index["source"], "compute_dtype": index["precision"], "method_used": extractor.method}
    )
    if extractor.merge_report is not None:
        metrics |= extractor.merge_report.metrics()
    metrics |= outliers.metrics(record)
    mlflow.log_metrics(metrics)


def _publish(work: Path, out: Path, run: StageRun) -> None:
    """Move the finished store into place, tag the run with its md5 and drop the work's marker."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work.rename(out)
    run.log_outputs(out)
    resume.release(work)  # the store moved into place: only the marker is left


def run(params: Params, source: Source, on_shard: Callable[[Shard], None] | None = None) -> Path:
    """Extract ``source`` activations over the prepared training set; returns the store directory.

    ``on_shard`` is called after each shard is written (the tests use it to simulate a kill).
    """
    import torch
    from accelerate import PartialState

    from lorascope.models import load_tokenizer
    from lorascope.progress import track
    from lorascope.tracking import stage_run

    cfg = params.extract
    root = workspace_root()
    prepared, base_dir = root / PREPARED, root / BASE
    doc_ids, docs = read_documents(prepared)
    inputs = [prepared, base_dir] + ([root / ADAPTER] if source == "lora" else [])
    state = PartialState(cpu=not torch.cuda.is_available())
    extractor = _load_extractor(cfg, source, root, docs, state)
    plan = plan_shards([len(d) for d in docs], cfg.shard_tokens)
    work, out, width = work_dir(source), store_dir(source), len(extractor.names)

    def done(shard: Shard) -> bool:
        return shard_complete(work / shard.file, shard.tokens, width, cfg.dtype)

    tracked = (
        stage_run("extract", params, inputs, run_name=source, tags={"extract.source": source})
        if state.is_main_process
        else nullcontext()
    )
    with tracked as tracked_run:
        if tracked_run is not None:
            _prepare_work(work, tracked_run, source)
        state.wait_for_everyone()
        resumed = sum(done(s) for s in plan) if state.is_main_process else 0
        todo = [s for s in plan if s.index % state.num_processes == state.process_index and not done(s)]
        started = time.perf_counter()
        shards = track(todo, f"extract {source}", total=len(todo)) if state.is_main_process else todo
        extracted = _extract_shards(extractor, shards, docs, work, cfg, on_shard)
        elapsed = time.perf_counter() - started
        state.wait_for_everyone()
        if tracked_run is not None:
            missing = [s.file for s in plan if not done(s)]
            if missing:
                raise LorascopeError(f"{work}: shards missing after extraction: {', '.join(missing[:5])}")
            tokenizer = load_tokenizer(base_dir)
            index = _index(source, cfg, extractor, base_dir, doc_ids, docs, plan, tokenizer)
            record = _write_index(work, index, cfg, tokenizer, state.device)
            throughput = extracted / elapsed if extracted else None
            _log_run(index, record, extractor, plan, work, resumed, state.num_processes, throughput)
            _publish(work, out, tracked_run)
    state.wait_for_everyone()
    return out
