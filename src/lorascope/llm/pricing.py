"""USD cost of LLM usage at list price, from ``genai-prices`` (Pydantic's maintained price data: tiers,
dated price changes, snapshot model names), so a labelling run can report what it spent.

The provider is the backend's: ``openai`` and ``anthropic`` are priced as those APIs (whatever their
``base_url``: a proxy in front of them bills the same); ``openai-compatible`` is priced only where
genai-prices knows the provider serving its ``base_url`` (OpenRouter, Together, Groq, ...): a self-hosted
server (``vllm serve``) has no list price. The package's bundled snapshot is used as installed, never
fetched at run time. Anything unpriced is ``None`` with a stated reason, never a crash and never 0.
"""

from __future__ import annotations

from dataclasses import dataclass

_PROVIDER = {"openai": "openai", "anthropic": "anthropic"}


@dataclass(frozen=True)
class Price:
    """A cost, or why there is none."""

    usd: float | None
    reason: str | None = None
    """Set exactly when ``usd`` is None: a one-line note for the run's record."""


def price(
    model: str,
    input_tokens: int,
    output_tokens: int,
    *,
    backend: str | None = None,
    base_url: str | None = None,
) -> Price:
    """The list price of one request's (or a run's) tokens on ``backend``; ``backend`` None matches the
    model across every provider genai-prices knows."""
    from genai_prices import Usage, calc_price

    if backend is not None and backend not in _PROVIDER and backend != "openai-compatible":
        return Price(None, f"backend {backend} is not a priced API")
    if backend == "openai-compatible" and not base_url:
        return Price(None, "openai-compatible backend without a base_url")
    where = (
        {"provider_api_url": base_url} if backend == "openai-compatible" else {"provider_id": _PROVIDER[backend]}
    ) if backend else {}  # fmt: skip
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    try:
        calc = calc_price(usage, model, **where)
    except (LookupError, ValueError) as err:  # unknown provider or model
        return Price(None, f"genai-prices has no price for {model!r} ({' '.join(str(err).split())})")
    return Price(float(calc.total_price))


def estimate_cost(
    model: str,
    input_tokens: int,
    output_tokens: int,
    *,
    backend: str | None = None,
    base_url: str | None = None,
) -> float | None:
    """USD at list price; None for anything unpriced (a local vLLM model, an unknown release).

    None means "unknown", not "free": a report should print it as such rather than as 0.
    """
    return price(model, input_tokens, output_tokens, backend=backend, base_url=base_url).usd
