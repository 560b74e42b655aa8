"""How a stage talks to its LLM: the client params ``autointerp`` and ``categorize`` share."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lorascope.sections import PositiveInt, Section

LlmBackend = Literal["openai", "anthropic", "openai-compatible", "heuristic"]
ReasoningEffort = Literal["minimal", "low", "medium", "high"]


class LlmClientSection(Section):
    """How one stage talks to its LLM (shared by ``autointerp`` and ``categorize``)."""

    backend: LlmBackend = "openai"
    """Client: ``openai``, ``anthropic``, ``openai-compatible`` (any base URL, e.g. vllm serve) or the
    offline ``heuristic`` baseline (no LLM; clearly labelled as such)."""
    model: str = "gpt-5-mini"
    """Model name sent to the backend."""
    base_url: str | None = None
    """Server URL for ``openai-compatible`` (e.g. ``http://gpu-node:8000/v1``); null for the vendors' APIs."""
    api_key_env: str | None = None
    """Environment variable holding the API key (default ``OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY``);
    keys are read from the environment only, never from params."""
    concurrency: PositiveInt = 16
    """Requests in flight at once."""
    max_retries: Annotated[int, Field(ge=0)] = 6
    """Retries per request on 429, 5xx, timeouts and connection errors (exponential backoff with
    jitter, honouring Retry-After: the official SDKs' own retry loop)."""
    timeout_s: Annotated[float, Field(gt=0)] = 120
    """Seconds before one request attempt times out."""
    max_tokens: PositiveInt = 32000
    """Completion token cap. Reasoning models (gpt-5-mini, the paper's labeller) spend part of it thinking,
    so it must leave room for that: OpenAI advises reserving at least 25,000 tokens; 32000 is also Claude
    Opus 4.1's output limit. Only the tokens used are billed. A reply cut at the cap (``finish_reason:
    length`` / ``stop_reason: max_tokens``) is a failure, counted (``truncated``), never a label."""
    temperature: float | None = None
    """Sampling temperature (null: the model's default; OpenAI reasoning models take none)."""
    reasoning_effort: ReasoningEffort | None = None
    """OpenAI reasoning models: ``minimal`` .. ``high`` (null: the model's default)."""
    structured_output: bool = True
    """Send each JSON reply's schema so the server constrains its answer (OpenAI ``response_format``
    ``json_schema``, Anthropic a forced tool call, vLLM's guided decoding through ``response_format``),
    read without repair. Set false for an ``openai-compatible`` server without ``json_schema`` support:
    replies are then free text, mended with json-repair. Ignored by the heuristic baseline."""
