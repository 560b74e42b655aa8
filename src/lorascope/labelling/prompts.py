"""The labelling prompts (the paper's Appendix B word for word, plus our detection prompt) and their parsers.

The templates are package data under ``prompts/``. They contain literal JSON braces, so they are filled by
substituting the exact placeholder strings, never with ``str.format``. Each parser raises ``ParseError``
with a one-line reason, which the stage records beside the raw reply. ``SCHEMAS`` holds the JSON schema of
each JSON reply, sent as structured output where the backend supports it; the B.2b reply is a bare id.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from lorascope.llm.structured import JsonReplyError, JsonSchema, parse_json

TemplateName = Literal["explain", "categories", "categorize", "detect"]

PLACEHOLDERS: dict[TemplateName, tuple[str, ...]] = {
    "explain": ("{activations_str}",),
    "categories": ("{feature_list}",),
    "categorize": ("{feature.explanation}", "{examples_str}", "{categories_str}"),
    "detect": ("{explanation}", "{snippets}"),
}
"""Each template's placeholders, exactly as they appear in its text."""

_TEMPLATE_DIR = Path(__file__).with_name("prompts")
_SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
_OPENING_FENCE = re.compile(r"^```[\w-]*\n")
_ID_PREFIX = re.compile(r"^(?:string_id|category(?:_id)?)\s*[:=]\s*", re.IGNORECASE)
_ID_NOISE = "\"'`*.,;:!?()[]{}<> \t\r\n"


@dataclass(frozen=True)
class Example:
    """One context window of one feature."""

    tokens: list[str]
    """The window's decoded tokens; ``"".join(tokens)`` is its text."""
    acts: list[float]
    """The feature's activation at each token, already sign-adjusted: positive means it fires."""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.acts):
            raise ValueError(f"an example has {len(self.tokens)} tokens but {len(self.acts)} activations")


@dataclass(frozen=True)
class Label:
    """A feature's explanation and how interpretable the labeller judged it (the B.1 answer)."""

    explanation: str
    classification: int
    """0 monosemantic, 1 broad but consistent, 2 polysemantic."""
    reasoning: str


@dataclass(frozen=True)
class Category:
    """One functional-role category (a B.2a answer entry)."""

    string_id: str
    name: str
    definition: str
    examples: list[str]


def _object(properties: dict[str, dict]) -> dict:
    """A JSON schema object in the subset every structured-output backend accepts: all keys required."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


_TEXT = {"type": "string"}
LABEL_SCHEMA = JsonSchema(
    "feature_explanation",
    _object(
        {
            "explanation": _TEXT,
            "classification": {"type": "integer", "enum": [0, 1, 2]},
            "classification_reasoning": _TEXT,
        }
    ),
)
"""The B.1 reply."""
CATEGORIES_SCHEMA = JsonSchema(
    "feature_categories",
    _object(
        {
            "categories": {
                "type": "array",
                "items": _object(
                    {
                        "string_id": _TEXT,
                        "name": _TEXT,
                        "definition": _TEXT,
                        "examples": {"type": "array", "items": _TEXT},
                    }
                ),
            },
            "summary": _TEXT,
        }
    ),
)
"""The B.2a reply (how many categories, snake_case ids and unique ids are checked by ``parse_categories``)."""
DETECTION_SCHEMA = JsonSchema(
    "snippet_matches", _object({"matches": {"type": "array", "items": {"type": "integer"}}})
)
"""The detection reply."""
SCHEMAS: dict[TemplateName, JsonSchema | None] = {
    "explain": LABEL_SCHEMA,
    "categories": CATEGORIES_SCHEMA,
    "categorize": None,  # "Reply with ONLY the category string_id": text, as the paper asks
    "detect": DETECTION_SCHEMA,
}
"""Each template's reply schema (None: a text reply)."""


class ParseError(ValueError):
    """A reply that does not answer in the format its prompt asks for; the message is one line."""


@cache
def template(name: TemplateName) -> str:
    """The template's text exactly as shipped."""
    if name not in PLACEHOLDERS:
        raise ValueError(f"unknown prompt template {name!r}; expected one of {', '.join(PLACEHOLDERS)}")
    return (_TEMPLATE_DIR / f"{name}.txt").read_text(encoding="utf-8")


def prompt_hash(name: TemplateName) -> str:
    """SHA-256 of the template text, recorded with each label set so a changed prompt is visible."""
    return hashlib.sha256(template(name).encode("utf-8")).hexdigest()


def activations_str(examples: list[Example], max_act: float) -> str:
    """The paper's activation format: per example, its text on one line, then one ``token value`` line per
    token the feature fired on, strongest first (ties in position order); examples separated by a blank line.

    Values are ``act / max_act`` on the paper's 0-10 scale (clipped) with two decimals; tokens that round to
    0.00 are left out. Newlines show as the two characters ``\\n`` and tokens without their surrounding
    whitespace (a whitespace-only token as its ``repr``), so every line is one text or one token, and a
    token line's last space separates the token from its value.
    """
    if not max_act > 0:  # also rejects NaN
        raise ValueError(f"max_act must be positive, got {max_act}")
    blocks = []
    for example in examples:
        fired: list[tuple[float, int, str]] = []
        for position, (token, act) in enumerate(zip(example.tokens, example.acts, strict=True)):
            if not act > 0:
                continue
            shown = f"{min(act / max_act * 10, 10.0):.2f}"
            if shown != "0.00":
                fired.append((float(shown), position, f"{_show_token(token)} {shown}"))
        fired.sort(key=lambda item: (-item[0], item[1]))
        blocks.append("\n".join([_escape_newlines("".join(example.tokens)), *(line for *_, line in fired)]))
    return "\n\n".join(blocks)


def explain_prompt(examples: list[Example], max_act: float) -> str:
    """The B.1 prompt for one feature."""
    return _fill("explain", {"{activations_str}": activations_str(examples, max_act)})


def category_generation_prompt(explanations: list[str]) -> str:
    """The B.2a prompt over a list of explanations, one ``- explanation`` line each."""
    feature_list = "\n".join(f"- {_escape_newlines(explanation)}" for explanation in explanations)
    return _fill("categories", {"{feature_list}": feature_list})


def categories_str(categories: list[Category]) -> str:
    """One ``string_id: Name - definition`` line per category."""
    return "\n".join(
        f"{c.string_id}: {_escape_newlines(c.name)} - {_escape_newlines(c.definition)}" for c in categories
    )


def examples_str(examples: list[Example], max_act: float, n: int = 5) -> str:
    """The first ``n`` examples in the activation format (B.2b shows a few, not all)."""
    return activations_str(examples[:n], max_act)


def categorize_prompt(
    explanation: str, examples: list[Example], max_act: float, categories: list[Category]
) -> str:
    """The B.2b prompt for one feature."""
    return _fill(
        "categorize",
        {
            "{feature.explanation}": explanation,
            "{examples_str}": examples_str(examples, max_act, n=len(examples)),  # the caller picks how many
            "{categories_str}": categories_str(categories),
        },
    )


def detection_prompt(explanation: str, snippets: list[str]) -> str:
    """The detection-scoring prompt: one ``<number>. <snippet>`` line per snippet, numbered from 1."""
    lines = "\n".join(f"{i}. {_escape_newlines(snippet)}" for i, snippet in enumerate(snippets, 1))
    return _fill("detect", {"{explanation}": explanation, "{snippets}": lines})


def parse_label(text: str, *, repair: bool = True) -> Label:
    """The B.1 reply; ``classification`` may come as a number or a digit string. ``repair``: read free
    text with json-repair (False for a structured reply: strict JSON)."""
    reply = _json_object(text, repair)
    classification = _as_int(_get(reply, "classification"))
    if classification not in (0, 1, 2):
        raise ParseError(f"classification must be 0, 1 or 2, got {reply['classification']!r}")
    return Label(
        explanation=_text(reply, "explanation"),
        classification=classification,
        reasoning=_text(reply, "classification_reasoning", allow_empty=True),
    )


def parse_categories(text: str, min_n: int, max_n: int, *, repair: bool = True) -> list[Category]:
    """The B.2a reply: between ``min_n`` and ``max_n`` categories with unique snake_case ids."""
    items = _get(_json_object(text, repair), "categories")
    if not isinstance(items, list):
        raise ParseError("'categories' must be a list")
    if not min_n <= len(items) <= max_n:
        raise ParseError(f"{len(items)} categories, expected {min_n} to {max_n}")
    categories = []
    for i, item in enumerate(items, 1):
        where = f"category {i}: "
        if not isinstance(item, dict):
            raise ParseError(f"{where}not a JSON object")
        string_id = _text(item, "string_id", where)
        if not _SNAKE_CASE.fullmatch(string_id):
            raise ParseError(f"{where}string_id {string_id!r} is not snake_case")
        examples = _get(item, "examples", where)
        if not isinstance(examples, list) or not all(isinstance(e, str) for e in examples):
            raise ParseError(f"{where}'examples' must be a list of strings")
        name, definition = _text(item, "name", where), _text(item, "definition", where)
        categories.append(Category(string_id, name, definition, examples))
    ids = [c.string_id for c in categories]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ParseError(f"duplicate string_id: {', '.join(duplicates)}")
    return categories


def parse_category_id(text: str, valid: list[str]) -> str:
    """The B.2b reply: one of ``valid``, once code fences, quotes, markdown emphasis, trailing punctuation
    and a ``string_id:`` (or ``category:``) prefix are stripped; case-insensitive."""
    reply, previous = _OPENING_FENCE.sub("", text.strip()), None
    while reply != previous:
        previous, reply = reply, _ID_PREFIX.sub("", reply.strip(_ID_NOISE))
    if reply in valid:
        return reply
    by_lower = {v.lower(): v for v in valid}
    if reply.lower() in by_lower:
        return by_lower[reply.lower()]
    raise ParseError(f"reply {_excerpt(text)} is not one of the categories ({', '.join(valid)})")


def parse_detection(text: str, n: int, *, repair: bool = True) -> list[bool]:
    """The detection reply ``{"matches": [...]}`` as a mask over the ``n`` snippets."""
    matches = _get(_json_object(text, repair), "matches")
    if not isinstance(matches, list):
        raise ParseError("'matches' must be a list of snippet numbers")
    mask = [False] * n
    for match in matches:
        number = _as_int(match)
        if number is None:
            raise ParseError(f"'matches' holds {match!r}, not a snippet number")
        if not 1 <= number <= n:
            raise ParseError(f"snippet {number} is out of range 1 to {n}")
        mask[number - 1] = True
    return mask


def _fill(name: TemplateName, values: dict[str, str]) -> str:
    """The template with its placeholders replaced in one pass, so a value that happens to contain another
    placeholder's text is never substituted into."""
    pattern = "|".join(re.escape(placeholder) for placeholder in PLACEHOLDERS[name])
    return re.sub(pattern, lambda m: values[m.group()], template(name))


def _escape_newlines(text: str) -> str:
    return text.replace("\n", "\\n")


def _show_token(token: str) -> str:
    stripped = token.strip()
    return _escape_newlines(stripped) if stripped else repr(token)


def _json_object(text: str, repair: bool) -> dict:
    try:
        value = parse_json(text, repair=repair)
    except JsonReplyError as err:
        raise ParseError(f"no usable JSON: {err.reason}") from err
    if not isinstance(value, dict):
        raise ParseError("expected a JSON object, got an array")
    return value


def _get(obj: dict, key: str, where: str = "") -> object:
    if key not in obj:
        raise ParseError(f"{where}missing key {key!r}")
    return obj[key]


def _text(obj: dict, key: str, where: str = "", allow_empty: bool = False) -> str:
    value = _get(obj, key, where)
    if not isinstance(value, str):
        raise ParseError(f"{where}{key!r} must be a string, got {type(value).__name__}")
    if not (allow_empty or value.strip()):
        raise ParseError(f"{where}{key!r} is empty")
    return value.strip()


def _as_int(value: object) -> int | None:
    """An int, or a string of decimal digits (models quote numbers); never a bool or a float."""
    if type(value) is int:
        return value
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value)
    return None


def _excerpt(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1] + "…")
