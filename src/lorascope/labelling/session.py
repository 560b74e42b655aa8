"""What autointerp and categorize share: the cached client of a params section, one LLM question
with its answer parsed (re-asked once when it does not parse), and the label-set file schema."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lorascope import paths
from lorascope.llm.clients import CachedClient
from lorascope.llm.params import LlmClientSection
from lorascope.llm.structured import JsonSchema

T = TypeVar("T")

REASK = (
    "\n\nYour previous reply could not be used ({reason}). Reply again, exactly in the format asked for "
    "above, with nothing else."
)


def cache_dir() -> Path:
    """The content-addressed LLM response cache, shared by every stage and run of the workspace."""
    from lorascope.project import workspace_root

    return workspace_root() / paths.checkpoints("llm-cache")


def open_client(cfg: LlmClientSection) -> CachedClient:
    """The cached client for ``cfg`` (the heuristic baseline included)."""
    from lorascope.llm.cache import DiskCache
    from lorascope.llm.clients import make_client

    if cfg.backend == "heuristic":
        from lorascope.labelling.heuristic import HeuristicClient

        client: Any = HeuristicClient()
    else:
        client = make_client(
            cfg.backend,
            cfg.model,
            base_url=cfg.base_url,
            max_retries=cfg.max_retries,
            timeout_s=cfg.timeout_s,
            api_key_env=cfg.api_key_env,
            reasoning_effort=cfg.reasoning_effort,
            structured_output=cfg.structured_output,
        )
    return CachedClient(client, DiskCache(cache_dir()))


@dataclass
class Answer:
    """One question's outcome: the parsed value, or the error and the raw reply that caused it."""

    value: Any
    raw: str
    error: str | None = None
    cached: bool = True
    input_tokens: int = 0
    output_tokens: int = 0
    truncated: bool = False
    """The reply was cut at ``max_tokens`` (a failure: its partial text is in ``raw``, never parsed)."""


async def ask(
    client: CachedClient,
    cfg: LlmClientSection,
    prompt: str,
    parse: Callable[..., T],
    schema: JsonSchema | None = None,
) -> Answer:
    """Ask ``prompt`` and parse the reply; a reply that does not parse is re-asked once with the
    reason, and a second failure is returned as an error with the raw text (never raised). A reply cut
    at ``max_tokens`` is a failed request (``truncated``), not re-asked: the same limit would cut it again.

    With a ``schema`` (a JSON reply) the request asks for structured output and ``parse`` is called with
    ``repair``: False when the server constrained the reply (strict JSON), True otherwise (json-repair)."""
    from lorascope.llm.completion import LlmError, TruncatedReply

    raws: list[str] = []
    out = Answer(None, "")
    for attempt in range(2):
        text = prompt if attempt == 0 else prompt + REASK.format(reason=out.error)
        try:
            done = await client.complete(
                text, max_tokens=cfg.max_tokens, temperature=cfg.temperature, schema=schema
            )
        except LlmError as e:
            if isinstance(e, TruncatedReply):
                raws.append(e.text)
                out.truncated = True
                out.input_tokens += e.input_tokens
                out.output_tokens += e.output_tokens
            out.raw, out.error, out.cached = "\n---\n".join(raws), f"request failed: {e}", False
            return out
        out.cached = out.cached and done.cached
        out.input_tokens += done.input_tokens
        out.output_tokens += done.output_tokens
        raws.append(done.text)
        out.raw = "\n---\n".join(raws)  # every reply, so a failure shows what was said
        try:
            value = parse(done.text) if schema is None else parse(done.text, repair=not done.structured)
            out.value, out.error = value, None
            return out
        except ValueError as e:  # ParseError, JsonReplyError
            out.error = " ".join(str(e).split())[:200]
    out.error = f"unparseable after a re-ask: {out.error}"
    return out
