"""The three benchmarks: where their data lives, how a row becomes a prompt and a gold answer.

lm-eval runs them from the task YAMLs in ``tasks/``; those call into this module, so loading,
shuffling and prompting are plain functions the tests exercise without lm-eval. A task reads its
hub dataset by default or, when the stage's metadata names one, a local file in the benchmark's own
format (jsonl, json, csv or parquet), evaluated as given: every row with a question and an answer.

Prompts are s1's (its lm-evaluation-harness fork): the bare problem for AIME and MATH500, the
question and its lettered choices for GPQA, with no instruction unless ``evaluate.instructions``
names one for the task.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorascope.errors import LorascopeError
from lorascope.evaluate.grading import Kind

LETTERS = "ABCD"
DATA_KEY = "lorascope_data"
"""Task metadata key: ``{task: local file}`` overrides of the hub datasets."""
SEED_KEY = "lorascope_choice_seed"
"""Task metadata key: the seed of the GPQA choice shuffle."""
INSTRUCTIONS_KEY = "lorascope_instructions"
"""Task metadata key: ``{task: text}`` appended to the prompt after a blank line."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its hub dataset, answer kind and the column names it may use."""

    name: str
    kind: Kind
    hub_path: str
    hub_name: str | None
    hub_split: str
    question: tuple[str, ...]
    answer: tuple[str, ...]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(  # s1's set: all 30 AIME 2024 problems, figure code kept only where needed
            "aime24_nofigures", "integer", "simplescaling/aime24_nofigures", None, "train",
            ("problem", "Problem"), ("answer", "Answer"),
        ),
        Benchmark(
            "math500", "latex", "HuggingFaceH4/MATH-500", None, "test",
            ("problem",), ("answer",),
        ),
        Benchmark(
            "gpqa_diamond", "choice", "Idavidrein/gpqa", "gpqa_diamond", "train",
            ("Question",), ("Correct Answer",),
        ),
    )
}  # fmt: skip


def available() -> str:
    return ", ".join(BENCHMARKS)


def benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in BENCHMARKS:
        raise LorascopeError(f"unknown task {name!r}; available: {available()}")
    return BENCHMARKS[name]


# ------------------------------------------------------------------------------------------ data
def read_local(path: str | Path) -> Any:
    """A local benchmark file as a ``datasets.Dataset`` (format from the suffix)."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise LorascopeError(f"{path}: benchmark file not found")
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
    if builder is None:
        raise LorascopeError(
            f"{path}: unsupported benchmark file type (expected .jsonl, .json, .csv or .parquet)"
        )
    if path.stat().st_size == 0:  # the datasets builders fail on it with a bare StopIteration
        raise LorascopeError(f"{path}: empty benchmark file (expected one question per row)")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # malformed JSON, a ragged CSV, not parquet: name the file, not the builder
        detail = " ".join(str(e).split())[:200]
        raise LorascopeError(f"{path}: unreadable as {builder} ({type(e).__name__}: {detail})") from None


def load(name: str, metadata: dict[str, Any]) -> Any:
    """The raw rows of ``name``: the local file named in ``metadata[DATA_KEY]`` if any, else the hub
    dataset."""
    import datasets

    b = benchmark(name)
    local = (metadata.get(DATA_KEY) or {}).get(name)
    if local:
        return read_local(local)
    try:
        return datasets.load_dataset(b.hub_path, b.hub_name, split=b.hub_split)
    except Exception as e:  # offline, gated without a token, renamed: say which dataset and how to avoid it
        detail = " ".join(str(e).split())[:200]
        raise LorascopeError(
            f"{name}: cannot load hub dataset {b.hub_path} ({detail}); "
            f"set evaluate.data.{name} to a local file"
        ) from None


def dataset(name: str, metadata: dict[str, Any]) -> Any:
    """What lm-eval evaluates: the processed rows as the ``test`` split."""
    import datasets

    return datasets.DatasetDict({"test": process(name, load(name, metadata), metadata)})


def counts(name: str, rows: Any) -> dict[str, int]:
    """Rows in the source (``load``'s) and rows skipped for a missing question or answer."""
    return {"rows": len(rows), "skipped_no_answer": sum(not has_answer(name, r) for r in rows)}


def _field(row: dict[str, Any], names: tuple[str, ...], raw: bool = False) -> str:
    """The first non-blank of the columns ``names``, stripped (``raw``: as it is, for prompts that
    must be the text s1 shows the model)."""
    for n in names:
        value = row.get(n)
        if value is not None and str(value).strip():
            return str(value) if raw else str(value).strip()
    return ""


def has_answer(name: str, row: dict[str, Any]) -> bool:
    """Whether the row has a gold answer (rows without one are skipped and counted, never graded)."""
    b = BENCHMARKS[name]
    ok = bool(_field(row, b.question)) and bool(_field(row, b.answer))
    if b.kind == "choice":
        ok = ok and all(_field(row, (f"Incorrect Answer {i}",)) for i in (1, 2, 3))
    return ok


def shuffled_choices(row: dict[str, Any], seed: int) -> tuple[list[str], str]:
    """The four choices in a fixed per-question order and the gold letter.

    The order depends only on ``seed`` and the question (its Record ID, else its text), so it is
    the same in every run, process and dataset order.
    """
    choices = [_field(row, ("Correct Answer",), raw=True)] + [
        _field(row, (f"Incorrect Answer {i}",), raw=True) for i in (1, 2, 3)
    ]
    key = _field(row, ("Record ID",)) or _field(row, ("Question",))
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    order = list(range(4))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return [choices[i] for i in order], LETTERS[order.index(0)]


def prompt(question: str, choices: list[str] | None = None, instruction: str | None = None) -> str:
    """The user turn as s1 gives it: the problem (GPQA: ``question\\n\\nA) ...\\nB) ...``), then the
    task's instruction after a blank line when one is configured."""
    text = question
    if choices is not None:
        text += "\n\n" + "\n".join(f"{letter}) {c}" for letter, c in zip(LETTERS, choices, strict=True))
    return f"{text}\n\n{instruction}" if instruction else text


def question_id(text: str) -> str:
    """A short stable id of a question (its text's digest): per-question results pair on it."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def process(name: str, rows: Any, metadata: dict[str, Any]) -> Any:
    """Every row with a question and an answer, normalised to ``qid``, ``question``, ``prompt``,
    ``gold`` (GPQA: with shuffled choices)."""
    b = BENCHMARKS[name]
    seed = int(metadata.get(SEED_KEY, 0))
    instruction = (metadata.get(INSTRUCTIONS_KEY) or {}).get(name)

    def fmt(row: dict[str, Any]) -> dict[str, Any]:
        question = _field(row, b.question, raw=True)
        out: dict[str, Any] = {"kind": b.kind, "question": question, "qid": question_id(question)}
        if b.kind == "choice":
            choices, gold = shuffled_choices(row, seed)
            return {**out, "prompt": prompt(question, choices, instruction), "gold": gold, "choices": choices}
        return {**out, "prompt": prompt(question, None, instruction), "gold": _field(row, b.answer)}

    return rows.filter(lambda row: has_answer(name, row)).map(fmt)


def score(doc: dict[str, Any], output: str) -> dict[str, float]:
    """lm-eval's per-document metrics: correct (``exact_match``) and whether the answer needed the
    last-number/letter fallback."""
    from lorascope.evaluate.answers import extract
    from lorascope.evaluate.grading import grade

    got = extract(output, doc["kind"])
    return {"exact_match": float(grade(doc["kind"], doc["gold"], got.text)), "fallback": float(got.fallback)}


def question_rows(
    tasks: Sequence[str], limit: int | None, data: dict[str, str], choice_seed: int, root: Path, key: str
) -> list[dict[str, Any]]:
    """The first ``limit`` (None: all) rows with an answer of each task, each with its ``task`` and ``row``:
    a fixed question set (``data``: ``evaluate.data``'s local files, relative to ``root``). No row at all is
    a one-line error naming ``key``."""
    metadata = {DATA_KEY: {t: str(root / p) for t, p in data.items()}, SEED_KEY: choice_seed}
    rows = []
    for task in tasks:
        processed = process(task, load(task, metadata), metadata)
        n = len(processed) if limit is None else min(limit, len(processed))
        for i, doc in enumerate(processed.select(range(n))):
            rows.append({"task": task, "row": i, **doc})
    if not rows:
        raise LorascopeError(f"{key}: no rows with an answer in {', '.join(tasks)}")
    return rows
