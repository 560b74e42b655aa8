"""Category assignment (paper B.2b): each feature's explanation and first examples -> one category id.

The reply is parsed against the listed ids; one that is not among them is re-asked once (``labelling.ask``),
then recorded as ``uncategorized`` with every raw reply. A request that fails for good (after the SDK's
retries) is recorded as ``failed``; it is not in the LLM cache, so a re-run asks it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

from lorascope.categorize.inputs import Feature
from lorascope.labelling.prompts import Category, categorize_prompt, parse_category_id
from lorascope.labelling.session import ask
from lorascope.llm.clients import CachedClient, run_all
from lorascope.llm.params import LlmClientSection

Status = Literal["ok", "uncategorized", "failed"]
_REQUEST_FAILED = "request failed"  # how ``ask`` words an error that is not a bad reply


@dataclass(frozen=True)
class Assignment:
    """One feature's category, or why it has none."""

    category: str | None
    status: Status
    raw_response: str
    """Every reply the question got (a re-ask's replies joined by ``---``)."""
    error: str | None = None


async def assign(
    client: CachedClient, cfg: LlmClientSection, feature: Feature, categories: list[Category]
) -> Assignment:
    """Ask the B.2b prompt for ``feature`` over ``categories``."""
    prompt = categorize_prompt(feature.explanation, list(feature.examples), feature.max_act, categories)
    valid = [c.string_id for c in categories]
    got = await ask(client, cfg, prompt, partial(parse_category_id, valid=valid))
    if got.error is None:
        return Assignment(got.value, "ok", got.raw)
    status: Status = "failed" if got.error.startswith(_REQUEST_FAILED) else "uncategorized"
    return Assignment(None, status, got.raw, got.error)


async def assign_all(
    client: CachedClient,
    cfg: LlmClientSection,
    jobs: list[tuple[Feature, list[Category]]],
    description: str,
) -> list[Assignment]:
    """``assign`` over ``(feature, categories)`` jobs, ``cfg.concurrency`` at a time, results in job order; a
    job that raised is recorded as ``failed`` with the exception, never dropped."""
    results = await run_all(jobs, lambda job: assign(client, cfg, *job), cfg.concurrency, description)
    return [
        Assignment(None, "failed", "", f"{type(r).__name__}: {' '.join(str(r).split())}")
        if isinstance(r, Exception)
        else r
        for r in results
    ]
