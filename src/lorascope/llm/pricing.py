"""Rough USD cost of LLM usage, so a labelling run can report what it spent.

List prices per million tokens (standard tier, prompts under 200k tokens, no batch or prompt-caching
discounts), as published by OpenAI and Anthropic in 2025; check them before quoting a figure.
"""

from __future__ import annotations

import re

_USD_PER_MILLION: dict[str, tuple[float, float]] = {  # model: (input, output)
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "claude-opus-4-1": (15.00, 75.00),
    "claude-opus-4": (15.00, 75.00),
    "claude-sonnet-4-5": (3.00, 15.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-3-5-haiku": (0.80, 4.00),
}
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")  # gpt-5-mini-2025-08-07, claude-opus-4-1-20250805


def estimate_cost(model: str, input_tokens: int, output_tokens: int) -> float | None:
    """USD at list price; None for a model not in the table (a local vLLM model, a newer release).

    None means "unknown", not "free": a report should print it as such rather than as 0.
    """
    prices = _USD_PER_MILLION.get(_SNAPSHOT.sub("", model))
    if prices is None:
        return None
    return (input_tokens * prices[0] + output_tokens * prices[1]) / 1e6
