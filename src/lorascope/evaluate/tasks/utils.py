"""lm-eval hooks of the lorascope tasks: thin calls into ``lorascope.evaluate.benchmarks``."""

from __future__ import annotations

from typing import Any

from lorascope.evaluate import benchmarks


def aime24_nofigures(**metadata: Any) -> Any:
    return benchmarks.dataset("aime24_nofigures", metadata)


def math500(**metadata: Any) -> Any:
    return benchmarks.dataset("math500", metadata)


def gpqa_diamond(**metadata: Any) -> Any:
    return benchmarks.dataset("gpqa_diamond", metadata)


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return benchmarks.score(doc, results[0])
