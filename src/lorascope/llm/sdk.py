"""The official SDKs behind ``make_client``: ``openai.AsyncOpenAI`` (OpenAI and compatible servers) and
``anthropic.AsyncAnthropic``, behind the ``Client`` interface of :mod:`lorascope.llm.clients` (retries,
structured output and failure messages: see that module). Imported only when such a client is made: the
offline heuristic backend never loads either SDK (seconds of imports per labelling stage)."""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from typing import Any, Generic, Literal, TypeVar

import anthropic
import openai

from lorascope.llm.completion import Backend, Completion, LlmError, TruncatedReply, one_line
from lorascope.llm.structured import JsonSchema

_OPENAI_REASONING = ("gpt-5", "o1", "o3", "o4")
_RETRYABLE_STATUS = (408, 409, 429)  # and every 5xx: the SDKs' rule, restated to word the error

S = TypeVar("S", openai.AsyncOpenAI, anthropic.AsyncAnthropic)


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

    sdk: type[S]
    """The SDK's async client class."""

    def _new_sdk(self) -> S:
        """An SDK client with this client's key, base URL, retries and timeout."""
        return self.sdk(
            api_key=self._api_key,
            base_url=self.base_url,
            max_retries=self.max_retries,
            timeout=self.timeout_s,
        )

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
            return one_line(f"{label}: cannot connect to {self.base_url or 'the default API URL'}{retried}")
        if isinstance(err, openai.APIStatusError | anthropic.APIStatusError):
            status = err.status_code
            message = _error_message(err.body) or err.message
            again = retried if status in _RETRYABLE_STATUS or status >= 500 else ""
            return one_line(f"{label}: HTTP {status}: {message}{again}")
        return one_line(f"{label}: {type(err).__name__}: {err}")


class OpenAIClient(_SdkClient[openai.AsyncOpenAI]):
    """Chat completions through ``openai.AsyncOpenAI`` (OpenAI itself or any compatible server)."""

    sdk = openai.AsyncOpenAI

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
            raise LlmError(one_line(f"{self.backend} {self.model}: refused: {refusal}"))
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
    sdk = anthropic.AsyncAnthropic

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


def _error_message(body: object) -> str | None:
    """The server's message in an error body: ``{"message": ...}`` (OpenAI, which unwraps ``error``)
    or ``{"type": "error", "error": {"message": ...}}`` (Anthropic)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) else None
