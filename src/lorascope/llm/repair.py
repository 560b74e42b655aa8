"""Recover the one JSON object or array in an LLM reply, repairing only slips whose fix is unambiguous.

Models wrap JSON in code fences and prose, write Python literals ('single quotes', True/None), leave
trailing commas, or emit word-processor “smart quotes”; each has exactly one sensible reading and is
repaired. Everything else (no value, two candidate values, truncated or mismatched brackets, an object
that stays invalid) raises ``JsonRepairError`` rather than guessing. Valid JSON goes to ``json.loads``
untouched, so it always round-trips.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any

_CLOSER = {"{": "}", "[": "]"}
_SMART_OPEN, _SMART_CLOSE = "\u201c", "\u201d"
_VALUE_START = "[{,:"  # a string can only begin after one of these (else a quote is prose: "[don't]")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/", "\\": "\\", '"': '"', "'": "'"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}  # \u is JSON's; \x and \U appear in Python reprs
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}
_TRAILING_COMMA = re.compile(r",\s*[}\]]")


class JsonRepairError(ValueError):
    """The reply holds no JSON object or array, several, or one whose repair would be a guess."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_json(text: str) -> dict | list:
    """The single JSON object or array in ``text``, repaired as the module docstring describes.

    Brackets outside the value are prose unless they parse: a ``[note]`` is skipped, a second valid
    value makes the reply ambiguous, and a ``{...}`` that cannot be repaired is an error (it is
    almost surely the intended object, broken).
    """
    try:
        value = json.loads(text)
    except ValueError:
        pass
    else:
        if isinstance(value, dict | list):
            return value
        raise JsonRepairError(f"expected a JSON object or array, got a JSON {type(value).__name__}")
    found: list[dict | list] = []
    i = 0
    while i < len(text):
        if text[i] not in _CLOSER:
            i += 1
            continue
        end, rewrite = _scan(text, i)
        value = _load(text[i:end], rewrite)
        if value is not None:
            found.append(value)
        elif text[i] == "{":
            raise JsonRepairError(f"the object at character {i} is not JSON and has no unambiguous repair")
        i = end
    if not found:
        raise JsonRepairError("no JSON object or array found")
    if len(found) > 1:
        raise JsonRepairError(f"{len(found)} JSON values found where exactly one was expected")
    return found[0]


def _load(span: str, rewrite: str | None) -> Any:
    """``span`` as JSON, else its repaired ``rewrite`` as JSON, else None."""
    for candidate in (span, rewrite):
        if candidate is not None:
            try:
                return json.loads(candidate)
            except ValueError:
                pass
    return None


def _scan(text: str, start: int) -> tuple[int, str | None]:
    """Find where the bracket at ``start`` closes, rewriting the span as JSON on the way.

    Returns the end index (exclusive) and the rewrite: every string re-encoded as a JSON string,
    trailing commas dropped, bare ``True``/``False``/``None`` as JSON literals. The rewrite is None
    when a string holds an escape that neither JSON nor Python defines.
    """
    stack: list[str] = []
    out: list[str] = []
    last = ""  # last significant character of the rewrite, to tell a string's opening quote from prose
    valid = True
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c in _CLOSER:
            stack.append(_CLOSER[c])
        elif c in "}]":
            if c != stack[-1]:
                raise JsonRepairError(f"mismatched {c!r} at character {i} (expected {stack[-1]!r})")
            stack.pop()
            if not stack:
                out.append(c)
                return i + 1, "".join(out) if valid else None
        elif c in ('"', "'", _SMART_OPEN) and last in _VALUE_START:
            i, value = _read_string(text, i + 1, _SMART_CLOSE if c == _SMART_OPEN else c)
            if value is None:
                valid = False
            else:
                out.append(json.dumps(value))
            last = '"'
            continue
        elif c == "," and _TRAILING_COMMA.match(text, i):
            i += 1
            continue
        elif c.isalpha() or c == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            out.append(_PY_LITERALS.get(word, word))
            last, i = word[-1], j
            continue
        out.append(c)
        if not c.isspace():
            last = c
        i += 1
    raise JsonRepairError(f"unterminated {text[start]!r} at character {start} (truncated reply?)")


def _read_string(text: str, i: int, close: str) -> tuple[int, str | None]:
    """Decode the string body starting at ``i`` up to its ``close`` quote.

    Returns the index after the quote and the value, or None as the value for an unknown escape.
    """
    start, chars, valid = i, [], True
    while i < len(text):
        c = text[i]
        if c == close:
            return i + 1, "".join(chars) if valid else None
        if c != "\\":
            chars.append(c)
            i += 1
            continue
        code = text[i + 1 : i + 2]
        if code in _ESCAPES:
            chars.append(_ESCAPES[code])
            i += 2
        elif code in _HEX_DIGITS:
            digits = text[i + 2 : i + 2 + _HEX_DIGITS[code]]
            hexadecimal = len(digits) == _HEX_DIGITS[code] and all(d in string.hexdigits for d in digits)
            point = int(digits, 16) if hexadecimal else -1
            if 0 <= point <= 0x10FFFF:
                chars.append(chr(point))
            else:
                valid = False
            i += 2 + len(digits)
        else:
            valid = False
            i += 2
    raise JsonRepairError(f"unterminated string at character {start - 1} (truncated reply?)")
