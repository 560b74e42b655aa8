"""The three benchmarks: where their data lives, how a row becomes a prompt and a gold answer.

lm-eval runs them from the task YAMLs in ``tasks/``; those call into this module, so loading,
filtering and shuffling are plain functions the tests exercise without lm-eval. A task reads its
hub dataset by default or, when the stage's metadata names one, a local file in the benchmark's own
format (jsonl, json, csv or parquet).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorascope.errors import LorascopeError
from lorascope.evaluate.answers import Kind

LETTERS = "ABCD"
DATA_KEY = "lorascope_data"
"""Task metadata key: ``{task: local file}`` overrides of the hub datasets."""
SEED_KEY = "lorascope_choice_seed"
"""Task metadata key: the seed of the GPQA choice shuffle."""


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
        Benchmark(
            "aime24_nofigures", "integer", "Maxwell-Jia/AIME_2024", None, "train",
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

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = (
    "Answer the following multiple choice question. Think step by step, then give your final answer "
    "as a single letter (A, B, C or D) within \\boxed{}."
)


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
    return datasets.load_dataset(builder, data_files=str(path), split="train")


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


def counts(name: str, metadata: dict[str, Any]) -> dict[str, int]:
    """Rows in the source, rows skipped for a missing answer, and (AIME) rows dropped for a figure."""
    rows = load(name, metadata)
    q = BENCHMARKS[name].question
    no_answer = sum(not has_answer(name, r) for r in rows)
    figures = sum(
        name == "aime24_nofigures" and has_answer(name, r) and "[asy]" in _field(r, q) for r in rows
    )
    return {"rows": len(rows), "skipped_no_answer": no_answer, "removed_figures": figures}


def _field(row: dict[str, Any], names: tuple[str, ...]) -> str:
    for n in names:
        value = row.get(n)
        if value is not None and str(value).strip():
            return str(value).strip()
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
    choices = [_field(row, ("Correct Answer",))] + [
        _field(row, (f"Incorrect Answer {i}",)) for i in (1, 2, 3)
    ]
    key = _field(row, ("Record ID",)) or _field(row, ("Question",))
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    order = list(range(4))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return [choices[i] for i in order], LETTERS[order.index(0)]


def process(name: str, rows: Any, metadata: dict[str, Any]) -> Any:
    """Rows with an answer, normalised to ``question``, ``prompt``, ``gold`` (AIME: without figures;
    GPQA: with shuffled choices)."""
    b = BENCHMARKS[name]
    seed = int(metadata.get(SEED_KEY, 0))

    def keep(row: dict[str, Any]) -> bool:
        if not has_answer(name, row):
            return False
        return not (name == "aime24_nofigures" and "[asy]" in _field(row, b.question))

    def fmt(row: dict[str, Any]) -> dict[str, Any]:
        question = _field(row, b.question)
        if b.kind == "choice":
            choices, gold = shuffled_choices(row, seed)
            listed = "\n".join(f"{letter}) {c}" for letter, c in zip(LETTERS, choices, strict=True))
            prompt = f"{CHOICE_INSTRUCTION}\n\n{question}\n\n{listed}"
            return {"kind": b.kind, "question": question, "prompt": prompt, "gold": gold, "choices": choices}
        prompt = f"{question}\n\n{MATH_INSTRUCTION}"
        return {"kind": b.kind, "question": question, "prompt": prompt, "gold": _field(row, b.answer)}

    return rows.filter(keep).map(fmt)


def score(doc: dict[str, Any], output: str) -> dict[str, float]:
    """lm-eval's per-document metrics: correct (``exact_match``) and whether the answer needed the
    last-number/letter fallback."""
    from lorascope.evaluate.answers import extract
    from lorascope.evaluate.grading import grade

    got = extract(output, doc["kind"])
    return {"exact_match": float(grade(doc["kind"], doc["gold"], got.text)), "fallback": float(got.fallback)}
