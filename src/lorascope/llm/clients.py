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
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Literal, Protocol, TypeVar

import anthropic
import openai
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
from lorascope.llm.completion import Completion, LlmError, TruncatedReply
from lorascope.llm.pricing import Price, price
from lorascope.llm.structured import JsonSchema

__all__ = [
    "Backend", "CachedClient", "Client", "Completion", "LlmError", "TruncatedReply", "make_client", "run_all",
]  # fmt: skip

Backend = Literal["openai", "anthropic", "openai-compatible"]
T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S", openai.AsyncOpenAI, anthropic.AsyncAnthropic)

_KEY_ENV: dict[str, str] = {
    "openai": "OPENAI_API_KEY",
    "openai-compatible": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
}
_OPENAI_REASONING = ("gpt-5", "o1", "o3", "o4")
_RETRYABLE_STATUS = (408, 409, 429)  # and every 5xx: the SDKs' rule, restated to word the error


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
    if backend == "anthropic":
        return AnthropicClient(model, base_url, api_key, max_retries, timeout_s, structured_output)
    return OpenAIClient(
        backend, model, base_url, api_key, max_retries, timeout_s, structured_output, reasoning_effort
    )


class _SdkClient(ABC, Generic[S]):
    """What both SDK clients share: an SDK client per event loop, the cache identity of a request, and
    one-line failure messages."""

    backend: Backend

    def __init__(
        self,
        model: str,
        base_url: str | None,
        api_key: str,
        max_retries: int,
        timeout_s: float,
        structured_output: bool = True,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.structured_output = structured_output
        self._api_key = api_key
        self._sdk_by_loop: dict[asyncio.AbstractEventLoop, S] = {}

    def _sdk(self) -> S:
        """The SDK client of the running event loop.

        An SDK client's connection pool belongs to the loop that opened it, so reusing one across
        ``asyncio.run`` calls fails ("Event loop is closed"): each loop gets its own. Those of finished
        loops are kept, not dropped: collected while another loop runs, one would schedule its close
        on that loop and fail noisily.
        """
        loop = asyncio.get_running_loop()
        if loop not in self._sdk_by_loop:
            self._sdk_by_loop[loop] = self._new_sdk()
        return self._sdk_by_loop[loop]

    @abstractmethod
    def _new_sdk(self) -> S:
        """An SDK client with this client's key, base URL, retries and timeout."""

    @abstractmethod
    def _params(
        self, prompt: str, max_tokens: int, temperature: float | None, schema: JsonSchema | None
    ) -> dict[str, Any]:
        """The SDK call's keyword arguments (the schema among them when ``structured_output``)."""

    @abstractmethod
    async def _send(self, params: dict[str, Any]) -> Completion:
        """Make the call; SDK exceptions propagate (``complete`` words them)."""

    def key_inputs(
        self, prompt: str, *, max_tokens: int, temperature: float | None, schema: JsonSchema | None = None
    ) -> dict[str, Any]:
        """Backend, base URL and the exact request parameters (model, messages, sampling, schema)."""
        return {
            "backend": self.backend,
            "base_url": self.base_url,
            "params": self._params(prompt, max_tokens, temperature, schema),
        }

    async def complete(
        self, prompt: str, *, max_tokens: int, temperature: float | None, schema: JsonSchema | None = None
    ) -> Completion:
        try:
            return await self._send(self._params(prompt, max_tokens, temperature, schema))
        except (openai.OpenAIError, anthropic.AnthropicError) as err:
            raise LlmError(self._describe(err)) from err

    def _describe(self, err: Exception) -> str:
        label = f"{self.backend} {self.model}"
        retried = f" (after {self.max_retries} retries)"
        if isinstance(err, openai.APITimeoutError | anthropic.APITimeoutError):
            return f"{label}: no response within {self.timeout_s:g} s{retried}"
        if isinstance(err, openai.APIConnectionError | anthropic.APIConnectionError):
            return _one_line(f"{label}: cannot connect to {self.base_url or 'the default API URL'}{retried}")
        if isinstance(err, openai.APIStatusError | anthropic.APIStatusError):
            status = err.status_code
            message = _error_message(err.body) or err.message
            again = retried if status in _RETRYABLE_STATUS or status >= 500 else ""
            return _one_line(f"{label}: HTTP {status}: {message}{again}")
        return _one_line(f"{label}: {type(err).__name__}: {err}")


class OpenAIClient(_SdkClient[openai.AsyncOpenAI]):
    """Chat completions through ``openai.AsyncOpenAI`` (OpenAI itself or any compatible server)."""

    def __init__(
        self,
        backend: Literal["openai", "openai-compatible"],
        model: str,
        base_url: str | None,
        api_key: str,
        max_retries: int,
        timeout_s: float,
        structured_output: bool,
        reasoning_effort: str | None,
    ) -> None:
        super().__init__(model, base_url, api_key, max_retries, timeout_s, structured_output)
        self.backend = backend
        self.reasoning_effort = reasoning_effort

    def _new_sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=self._api_key,
            base_url=self.base_url,
            max_retries=self.max_retries,
            timeout=self.timeout_s,
        )

    def _params(
        self, prompt: str, max_tokens: int, temperature: float | None, schema: JsonSchema | None
    ) -> dict[str, Any]:
        """Reasoning models (gpt-5*, o-series) take ``max_completion_tokens`` and only the default
        temperature, so a requested one is dropped for them (and so is not part of the cache key)."""
        params: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
        if self.model.startswith(_OPENAI_REASONING):
            params["max_completion_tokens"] = max_tokens
        else:
            params["max_tokens"] = max_tokens
            if temperature is not None:
                params["temperature"] = temperature
        if self.reasoning_effort is not None:
            params["reasoning_effort"] = self.reasoning_effort
        if schema is not None and self.structured_output:
            params["response_format"] = schema.openai_response_format()
        return params

    async def _send(self, params: dict[str, Any]) -> Completion:
        raw = await self._sdk().chat.completions.with_raw_response.create(**params)
        response = raw.parse()
        choice = response.choices[0] if response.choices else None
        usage = response.usage
        if choice is not None and choice.finish_reason == "length":
            limit = params.get("max_completion_tokens", params.get("max_tokens"))
            raise TruncatedReply(
                f"{self.backend} {self.model}: reply cut at the completion-token limit ({limit}; "
                "finish_reason: length): raise max_tokens",
                choice.message.content or "",
                usage.prompt_tokens if usage else 0,
                usage.completion_tokens if usage else 0,
            )
        refusal = getattr(choice.message, "refusal", None) if choice is not None else None
        if refusal:  # structured outputs: the model declined, with a reason instead of content
            raise LlmError(_one_line(f"{self.backend} {self.model}: refused: {refusal}"))
        if choice is None or not choice.message.content:
            reason = choice.finish_reason if choice else "no choices"
            raise LlmError(f"{self.backend} {self.model}: empty reply (finish_reason: {reason})")
        return Completion(
            text=choice.message.content,
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            model=response.model,
            retries=raw.retries_taken,
            structured="response_format" in params,
        )


class AnthropicClient(_SdkClient[anthropic.AsyncAnthropic]):
    """Messages through ``anthropic.AsyncAnthropic``."""

    backend: Backend = "anthropic"

    def _new_sdk(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            api_key=self._api_key,
            base_url=self.base_url,
            max_retries=self.max_retries,
            timeout=self.timeout_s,
        )

    def _params(
        self, prompt: str, max_tokens: int, temperature: float | None, schema: JsonSchema | None
    ) -> dict[str, Any]:
        """``temperature`` travels in ``extra_body``: anthropic 1.0 dropped the sampling keywords (the API
        deprecates them; newer models accept only the default) while older models still honour it. A
        schema becomes the request's one tool, forced with ``tool_choice`` (Anthropic's structured output)."""
        params: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }
        if temperature is not None:
            params["extra_body"] = {"temperature": temperature}
        if schema is not None and self.structured_output:
            params["tools"] = [schema.anthropic_tool()]
            params["tool_choice"] = {"type": "tool", "name": schema.name}
        return params

    async def _send(self, params: dict[str, Any]) -> Completion:
        raw = await self._sdk().messages.with_raw_response.create(**params)
        message = await raw.parse()
        tool = params["tool_choice"]["name"] if "tool_choice" in params else None
        calls = [b for b in message.content if b.type == "tool_use" and b.name == tool]
        if calls:  # the forced tool call: its input is the answer, serialised as the reply's text
            text = json.dumps(calls[0].input, ensure_ascii=False)
        else:  # no tool requested, or a server that ignored it: free text (read with repair)
            text = "".join(block.text for block in message.content if block.type == "text")
        if message.stop_reason == "max_tokens":
            raise TruncatedReply(
                f"anthropic {self.model}: reply cut at the completion-token limit ({params['max_tokens']}; "
                "stop_reason: max_tokens): raise max_tokens",
                text,
                message.usage.input_tokens,
                message.usage.output_tokens,
            )
        if not text:
            raise LlmError(f"anthropic {self.model}: empty reply (stop_reason: {message.stop_reason})")
        return Completion(
            text=text,
            input_tokens=message.usage.input_tokens,
            output_tokens=message.usage.output_tokens,
            model=message.model,
            retries=raw.retries_taken,
            structured=bool(calls),
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


def _error_message(body: object) -> str | None:
    """The server's message in an error body: ``{"message": ...}`` (OpenAI, which unwraps ``error``)
    or ``{"type": "error", "error": {"message": ...}}`` (Anthropic)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) else None


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
