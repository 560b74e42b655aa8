"""SAE subcategories: within each shared category that holds enough SAE features, generate subcategories from
those features' explanations (the B.2a prompt) and assign each of them one (the B.2b prompt).

The rule (recorded in ``categories.json``): see ``SUBCATEGORY_RULE``. A subcategory set whose generation fails
after the re-ask is recorded (status ``failed``, error, raw reply) rather than stopping the stage: the shared
categories and every assignment still stand, and the features of that category keep a null subcategory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorascope.categorize.assignment import Assignment, assign_all
from lorascope.categorize.generation import category_dict, generate, sample_explanations
from lorascope.categorize.inputs import Feature
from lorascope.categorize.params import CategorizeSection
from lorascope.labelling.prompts import Category
from lorascope.llm.clients import CachedClient, run_all

SUBCATEGORY_RULE = (
    "SAE subcategories are generated for each category holding at least min_categories SAE features "
    "(status ok), from a seeded sample (sample_size, seed) of those features' explanations with the "
    "category-generation prompt; a reply may give min(2, min_categories) to max_categories subcategories "
    "(the prompt asks for 5-8, but a small category may not support that many). Each SAE feature of such a "
    "category is then assigned one subcategory with the assignment prompt; every other feature's subcategory "
    "is null."
)
"""How subcategories are made, recorded in ``categories.json``."""


def subcategory_range(cfg: CategorizeSection) -> tuple[int, int]:
    """How many subcategories a reply may give: ``min(2, min_categories)`` to ``max_categories``."""
    return min(2, cfg.min_categories), cfg.max_categories


@dataclass
class Subcategories:
    """The outcome: each category's subcategory set (where one was made), what happened per category, and
    each subcategorized SAE feature's assignment."""

    sets: dict[str, list[Category]] = field(default_factory=dict)
    """Category id -> its subcategories (only categories where generation succeeded)."""
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Category id -> ``features``, ``status`` (ok | failed | too_few_features), ``error``, ``raw_response``,
    ``categories`` (the subcategories as dicts): the ``sae_subcategories`` entry of ``categories.json``."""
    assigned: dict[str, Assignment] = field(default_factory=dict)
    """SAE feature name -> its subcategory assignment."""


async def sae_subcategories(
    generator: CachedClient,
    assigner: CachedClient,
    cfg: CategorizeSection,
    categories: list[Category],
    features: list[Feature],
    assigned: list[Assignment],
) -> Subcategories:
    """Subcategories of the SAE ``features`` (with their category ``assigned``, in the same order)."""
    members: dict[str, list[Feature]] = {c.string_id: [] for c in categories}
    for f, a in zip(features, assigned, strict=True):
        if f.source == "sae" and a.status == "ok" and a.category is not None:
            members[a.category].append(f)
    out = Subcategories()
    for cat, found in members.items():
        out.info[cat] = {"features": len(found), "status": "too_few_features", "error": None,
                         "raw_response": None, "categories": None}  # fmt: skip
    eligible = [cat for cat, found in members.items() if len(found) >= cfg.min_categories]
    lo, hi = subcategory_range(cfg)

    async def make(cat: str) -> Any:
        shown = sample_explanations([f.explanation for f in members[cat]], cfg.sample_size, cfg.seed)
        return await generate(generator, cfg.generate, shown, lo, hi)

    made = await run_all(eligible, make, cfg.generate.concurrency, "categorize: SAE subcategories")
    for cat, answer in zip(eligible, made, strict=True):
        info = out.info[cat]
        if isinstance(answer, Exception):
            info.update(status="failed", error=f"{type(answer).__name__}: {' '.join(str(answer).split())}")
        elif answer.error is not None:
            info.update(status="failed", error=answer.error, raw_response=answer.raw)
        else:
            out.sets[cat] = answer.value
            info.update(
                status="ok", raw_response=answer.raw, categories=[category_dict(c) for c in answer.value]
            )
    jobs = [(f, subs) for cat, subs in out.sets.items() for f in members[cat]]
    done = await assign_all(assigner, cfg.assign, jobs, "categorize: assign SAE subcategories")
    out.assigned = {f.feature_name: a for (f, _), a in zip(jobs, done, strict=True)}
    return out
