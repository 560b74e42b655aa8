"""Category generation (paper B.2a): one prompt over a seeded sample of explanations returns the categories.

The same prompt and parser serve the shared categories (an equal number of LoRA and MLP explanations, as the
paper prompts with "an equal number of MLP neurons and LoRA directions", mixed in a seeded order, so both
sources are described in one vocabulary) and the SAE subcategories of one category (that category's SAE
explanations). A reply that does not parse is re-asked once (``labelling.ask``); what the caller does with
a second failure differs: fatal for the shared categories, recorded for a subcategory set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from functools import partial
from typing import Any

from lorascope.labelling.prompts import (
    CATEGORIES_SCHEMA,
    Category,
    category_generation_prompt,
    parse_categories,
)
from lorascope.labelling.session import Answer, ask
from lorascope.llm.clients import CachedClient
from lorascope.llm.params import LlmClientSection


def sample_explanations(explanations: Sequence[str], size: int, seed: int) -> list[str]:
    """Up to ``size`` of ``explanations``, drawn without replacement in a seeded random order (so LoRA and
    MLP explanations are interleaved rather than listed source by source)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(explanations))[:size]
    return [explanations[int(i)] for i in order]


def sample_equal(
    pools: Mapping[str, Sequence[str]], size: int, seed: int
) -> tuple[list[str], dict[str, int]]:
    """An equal number of explanations from each pool: ``n = min(size // len(pools), smallest pool)`` drawn
    without replacement from each (seeded, pools in the given order), then mixed in one seeded order.
    Returns the sample and ``n`` per pool."""
    import numpy as np

    n = min(size // len(pools), *(len(p) for p in pools.values()))
    rng = np.random.default_rng(seed)
    picked = [pool[int(i)] for pool in pools.values() for i in rng.permutation(len(pool))[:n]]
    return [picked[int(i)] for i in rng.permutation(len(picked))], dict.fromkeys(pools, n)


async def generate(
    client: CachedClient, cfg: LlmClientSection, explanations: list[str], min_n: int, max_n: int
) -> Answer:
    """Ask the B.2a prompt over ``explanations``; the answer's value is a list of ``Category``."""
    prompt = category_generation_prompt(explanations)
    parse = partial(parse_categories, min_n=min_n, max_n=max_n)
    return await ask(client, cfg, prompt, parse, CATEGORIES_SCHEMA)


def category_dict(category: Category) -> dict[str, Any]:
    """``string_id``, ``name``, ``definition``, ``examples`` of a category, for JSON."""
    return asdict(category)
