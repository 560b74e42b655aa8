"""JSON replies: the schema a prompt asks for, and the one JSON value read from a reply.

Where the backend can constrain its output, the schema is sent with the request and the reply is JSON
by construction: OpenAI ``response_format`` ``json_schema`` (strict), vLLM's guided decoding through the
same field of its OpenAI-compatible API, Anthropic a forced tool call whose ``input`` is the answer. Such
a reply is read with ``json.loads`` and nothing else. A server that cannot (an ``openai-compatible``
backend with ``structured_output: false``) answers in free text, which goes through ``json-repair``
(code fences, prose around the object, single quotes, Python literals, trailing commas, smart quotes);
a reply holding several JSON values is ambiguous and refused rather than guessed at, and one holding
no object or array is refused too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["JsonReplyError", "JsonSchema", "parse_json"]


@dataclass(frozen=True)
class JsonSchema:
    """A named JSON schema for a reply. ``schema`` follows the subset that OpenAI's strict mode, vLLM's
    guided decoding and Anthropic's tool ``input_schema`` all accept: every property required,
    ``additionalProperties: false``, types and ``enum`` only (counts and patterns are checked by the
    parsers)."""

    name: str
    """``[A-Za-z0-9_-]``, at most 64 characters (the vendors' rule for schema and tool names)."""
    schema: Mapping[str, Any] = field(hash=False)
    description: str = "Give the answer in exactly this structure."

    def openai_response_format(self) -> dict[str, Any]:
        """The chat-completions ``response_format`` (also vLLM's guided decoding)."""
        return {
            "type": "json_schema",
            "json_schema": {"name": self.name, "schema": dict(self.schema), "strict": True},
        }

    def anthropic_tool(self) -> dict[str, Any]:
        """The one tool of an Anthropic request; ``tool_choice`` forces it, so its input is the answer."""
        return {"name": self.name, "description": self.description, "input_schema": dict(self.schema)}


class JsonReplyError(ValueError):
    """The reply holds no JSON object or array, several, or (structured) is not JSON at all."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_json(text: str, *, repair: bool = True) -> dict | list:
    """The one JSON object or array in ``text``.

    Valid JSON is returned as ``json.loads`` reads it. ``repair=False`` (a reply the server constrained to
    a schema) stops there. Otherwise the values that parse as they stand inside the text (after prose, in
    code fences) are collected: several are ambiguous; one is the answer unless a ``{`` outside it starts
    something else. Failing that, ``json_repair`` mends the text from the first ``{`` to the last ``}``
    (``[`` / ``]`` when there is no brace), and a result that lost one of the text's objects (two objects,
    or one beyond repair) is refused.
    """
    try:
        value = json.loads(text)
    except ValueError as err:
        if not repair:
            raise JsonReplyError(f"structured reply is not valid JSON ({err})") from None
    else:
        return _container(value)
    found = _embedded(text)
    if len(found) > 1:
        raise JsonReplyError(f"{len(found)} JSON values found where exactly one was expected")
    if found and not _stray_braces(text, found[0][1], found[0][2]):
        return found[0][0]
    return _repaired(text)


def _container(value: Any) -> dict | list:
    if isinstance(value, dict | list):
        return value
    raise JsonReplyError(f"expected a JSON object or array, got a JSON {type(value).__name__}")


def _embedded(text: str) -> list[tuple[dict | list, int, int]]:
    """Every object or array that parses as it stands, with its span, scanning left to right past each
    one found (so a value's nested brackets are not counted again); brackets that start none are prose."""
    decoder = json.JSONDecoder()
    found: list[tuple[dict | list, int, int]] = []
    i = 0
    while (i := _next_opener(text, i)) >= 0:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        found.append((value, i, end))
        i = end
    return found


def _next_opener(text: str, start: int) -> int:
    hits = [j for j in (text.find(c, start) for c in "{[") if j >= 0]
    return min(hits, default=-1)


def _stray_braces(text: str, start: int, end: int) -> bool:
    """Whether a ``{`` outside ``text[start:end]`` may start a second, broken object."""
    return "{" in text[:start] or "{" in text[end:]


def _repaired(text: str) -> dict | list:
    import json_repair

    open_, close = ("{", "}") if "{" in text else ("[", "]")
    first = text.find(open_)
    if first < 0:
        raise JsonReplyError("no JSON object or array found")
    last = text.rfind(close)
    span = text[first : last + 1 if last > first else len(text)]  # no closer: a cut reply, mended
    value = json_repair.loads(span)
    if not isinstance(value, dict | list):
        raise JsonReplyError("no JSON object or array found")
    if text.count("{", first) > _braces_in(value):  # json_repair keeps one of several objects
        raise JsonReplyError("several JSON objects, or one beyond repair, where exactly one was expected")
    if isinstance(value, list) and open_ == "{":
        raise JsonReplyError("several JSON values found where exactly one was expected")
    return value


def _braces_in(value: Any) -> int:
    """The ``{`` a JSON value accounts for: one per object, and those inside its strings."""
    if isinstance(value, dict):
        return 1 + sum(_braces_in(k) + _braces_in(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_braces_in(v) for v in value)
    return value.count("{") if isinstance(value, str) else 0
