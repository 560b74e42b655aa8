"""One async interface over the OpenAI and Anthropic SDKs, a caching wrapper, and bounded fan-out.

Retries are the official SDKs' own (read in openai 3.x and anthropic 2.x ``_base_client.py``): a
request is re-sent after a timeout, a connection error, HTTP 408, 409, 429 or any 5xx (or when the
server sends ``x-should-retry: true``), up to ``max_retries`` times, sleeping ``min(0.5 * 2**n, 8)`` s
less up to 25 % jitter, unless the server says how long to wait: a positive ``retry-after-ms``
(preferred) or ``retry-after`` (seconds or an HTTP date) is honoured (OpenAI: up to 120 s; longer is
not retried). Each attempt carries an ``x-stainless-retry-count`` header, and the raw response's
``retries_taken`` becomes ``Completion.retries``. ``timeout_s`` is httpx's per-attempt limit on each
phase (connect, write, and each read, in practice the wait for the answer), not on the whole call.

Structured output: a request with a ``JsonSchema`` carries it where the backend can constrain its reply
(OpenAI and compatible servers: ``response_format`` ``json_schema``, which vLLM serves by guided decoding;
Anthropic: the schema as the one tool, forced with ``tool_choice``, whose ``input`` becomes the reply's
text), and the ``Completion`` says so (``structured``), so the caller reads it without repair. With
``structured_output=False`` (an ``openai-compatible`` server without ``json_schema`` support) the schema
is not sent and the reply is free text.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lorascope.llm.cache import CacheKey, DiskCache
from lorascope.llm.completion import Backend, Completion, LlmError, TruncatedReply
from lorascope.llm.pricing import Price, price
from lorascope.llm.structured import JsonSchema

__all__ = [
    "Backend", "CachedClient", "Client", "Completion", "LlmError", "TruncatedReply", "make_client", "run_all",
]  # fmt: skip

T = TypeVar("T")
R = TypeVar("R")

_KEY_ENV: dict[str, str] = {
    "openai": "OPENAI_API_KEY",
    "openai-compatible": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
}


class Client(Protocol):
    """An LLM that answers one user-message prompt."""

    model: str

    def key_inputs(
        self, prompt: str, *, max_tokens: int, temperature: float | None, schema: JsonSchema | None = None
    ) -> dict[str, Any]:
        """Everything that determines the answer (never credentials): what ``CachedClient`` keys on."""
        ...

    async def complete(
        self, prompt: str, *, max_tokens: int, temperature: float | None, schema: JsonSchema | None = None
    ) -> Completion:
        """The answer (constrained to ``schema`` where the backend can); raises ``LlmError`` when the
        request fails after retries."""
        ...


def make_client(
    backend: Backend,
    model: str,
    *,
    base_url: str | None = None,
    max_retries: int = 6,
    timeout_s: float = 120,
    api_key_env: str | None = None,
    reasoning_effort: str | None = None,
    structured_output: bool = True,
) -> Client:
    """A client for ``backend``; the API key comes only from the environment (``api_key_env``).

    Default variables: ``OPENAI_API_KEY`` (both OpenAI backends) and ``ANTHROPIC_API_KEY``. The
    ``openai-compatible`` backend needs ``base_url`` and, when the default variable is unset, sends
    ``EMPTY`` (what ``vllm serve`` without ``--api-key`` accepts). ``reasoning_effort`` is the OpenAI
    chat parameter (e.g. ``minimal`` for gpt-5 models). ``structured_output``: send a request's JSON
    schema (false for a server that does not support ``response_format`` ``json_schema``).
    """
    if backend not in _KEY_ENV:
        raise LlmError(f"unknown LLM backend {backend!r}; expected one of {', '.join(_KEY_ENV)}")
    if backend == "openai-compatible" and not base_url:
        raise LlmError("the openai-compatible backend needs a base_url (e.g. http://localhost:8000/v1)")
    if backend == "anthropic" and reasoning_effort is not None:
        raise LlmError("reasoning_effort is an OpenAI parameter; the anthropic backend does not take it")
    env = api_key_env or _KEY_ENV[backend]
    api_key = os.environ.get(env) or None
    if api_key is None and backend == "openai-compatible" and api_key_env is None:
        api_key = "EMPTY"
    if api_key is None:
        raise LlmError(f"{env} is not set (needed by the {backend} backend)")
    from lorascope.llm.sdk import AnthropicClient, OpenAIClient  # the SDKs load here, not for the heuristic

    if backend == "anthropic":
        return AnthropicClient(model, base_url, api_key, max_retries, timeout_s, structured_output)
    return OpenAIClient(
        backend, model, base_url, api_key, max_retries, timeout_s, structured_output, reasoning_effort
    )


class CachedClient:
    """A ``Client`` that answers from a ``DiskCache`` when it can, and counts what it spent.

    ``requests`` counts prompts sent to the backend (each may have taken SDK ``retries``), ``hits``
    prompts answered from the cache, ``truncated`` replies cut at the token limit (raised as
    ``TruncatedReply``, never cached); the token counts cover the requests only (cut replies included:
    they are billed).
    """

    def __init__(self, client: Client, cache: DiskCache) -> None:
        self.client = client
        self.cache = cache
        self.model = client.model
        self.requests = 0
        self.hits = 0
        self.retries = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.truncated = 0

    def key_inputs(
        self, prompt: str, *, max_tokens: int, temperature: float | None, schema: JsonSchema | None = None
    ) -> dict[str, Any]:
        return self.client.key_inputs(prompt, max_tokens=max_tokens, temperature=temperature, schema=schema)

    async def complete(
        self, prompt: str, *, max_tokens: int, temperature: float | None, schema: JsonSchema | None = None
    ) -> Completion:
        key = CacheKey.of(
            self.key_inputs(prompt, max_tokens=max_tokens, temperature=temperature, schema=schema)
        )
        hit = self.cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.requests += 1
        try:
            completion = await self.client.complete(
                prompt, max_tokens=max_tokens, temperature=temperature, schema=schema
            )
        except TruncatedReply as cut:
            self.truncated += 1
            self.input_tokens += cut.input_tokens
            self.output_tokens += cut.output_tokens
            raise
        self.retries += completion.retries
        self.input_tokens += completion.input_tokens
        self.output_tokens += completion.output_tokens
        self.cache.put(key, completion)
        return completion

    def price(self, input_tokens: int, output_tokens: int) -> Price:
        """The list price of these tokens on this client's backend (genai-prices), or why there is none."""
        backend = getattr(self.client, "backend", None)
        return price(
            self.model,
            input_tokens,
            output_tokens,
            backend=backend,
            base_url=getattr(self.client, "base_url", None),
        )

    def cost_usd(self) -> float | None:
        """List-price cost of the requests made (cache hits are free); None for an unpriced model
        (``cost_note`` says why)."""
        return self.price(self.input_tokens, self.output_tokens).usd

    def cost_note(self) -> str | None:
        """Why ``cost_usd`` is None; None when it is a number."""
        return self.price(self.input_tokens, self.output_tokens).reason


async def run_all(
    items: Sequence[T], fn: Callable[[T], Awaitable[R]], concurrency: int, progress_description: str
) -> list[R | Exception]:
    """``fn`` over ``items`` with at most ``concurrency`` calls in flight, under a progress bar.

    Results come back in input order; an item whose call raised holds its exception instead, so one
    failed request never costs the others' answers. ``concurrency`` workers pull the next item (rather
    than one task per item behind a semaphore), so memory stays flat for 100k-item runs.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    results: dict[int, R | Exception] = {}
    pending = iter(enumerate(items))
    failed = 0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(progress_description, total=len(items), failed=0)

        async def worker() -> None:
            nonlocal failed
            for i, item in pending:
                try:
                    results[i] = await fn(item)
                except Exception as err:  # recorded for the caller: never lose an item
                    results[i] = err
                    failed += 1
                progress.update(task, advance=1, failed=failed)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(items)))))
    return [results[i] for i in range(len(items))]
