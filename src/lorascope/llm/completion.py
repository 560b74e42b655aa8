"""What one LLM request returns and how it fails: shared by the clients and the cache (which stores them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorascope.errors import LorascopeError

Backend = Literal["openai", "anthropic", "openai-compatible"]
"""The LLM backends: the official SDKs (``openai`` also serves OpenAI-compatible servers)."""


@dataclass(frozen=True)
class Completion:
    """One answer with its token usage (for cost accounting) and the model name the server reported."""

    text: str
    input_tokens: int
    output_tokens: int
    model: str
    cached: bool = False
    """True when read from the disk cache (no request was made)."""
    retries: int = 0
    """Retries the SDK took before this answer (0 for a cached answer)."""
    structured: bool = False
    """The server was asked to constrain the reply to a JSON schema (structured output), so it is read
    without repair."""


class LlmError(LorascopeError):
    """A request that could not be made or failed for good (after the SDK's retries); one-line message.

    A ``LorascopeError``, so a stage that lets one through ends with ``error: <message>`` and no
    traceback; ``run_all`` records it per item instead of raising.
    """


class TruncatedReply(LlmError):
    """A reply the server cut at the completion-token limit (OpenAI ``finish_reason: length``, Anthropic
    ``stop_reason: max_tokens``): never used as an answer and never cached, but kept for the record.

    A reasoning model spends part of the limit thinking, so a cut reply may hold no text at all."""

    def __init__(self, message: str, text: str, input_tokens: int = 0, output_tokens: int = 0) -> None:
        super().__init__(message)
        self.text = text
        """Whatever text arrived before the cut (often empty)."""
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, cut at ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
