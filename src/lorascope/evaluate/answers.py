"""Final-answer extraction from model outputs in the s1 format (``<|im_start|>think/answer`` sections).

Extraction is separate from grading so that a run records *how* each answer was found: answers only
recovered by the loose fallback heuristics are counted apart from boxed or ``Answer:`` ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from lorascope.evaluate.grading import Kind, normalize

ANSWER_MARKER = "<|im_start|>answer"
THINK_MARKER = "<|im_start|>think"

_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*")
_BARE_BOX = re.compile(r"[^\s${}]+")
# "Answer: X", "**Final Answer:** X", "The correct answer is (X)": the rest of that line
_ANSWER = re.compile(r"\banswer(?:\s*\*\*)?\s*(?::|is\b:?)[ \t]*(?P<rest>[^\n]*)", re.IGNORECASE)
_UNARY = r"(?:(?<![\w)}\]])-)?"
_INTEGER = re.compile(_UNARY + r"(?<![\d.])(?:\d{1,3}(?:,\d{3})+|\d+)(?![\d,]*\.\d)(?!,?\d)")
_NUMBER = re.compile(_UNARY + r"(?<![\d.])(?:\d+/\d+|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+)(?![\d/])")
_LETTER = re.compile(r"\(([A-D])\)|\b([A-D])\b")
_WRAPPED_LETTER = re.compile(r"\(?([A-D])(?![A-Za-z])")


@dataclass(frozen=True)
class Extracted:
    """One extracted answer and the rule that found it."""

    text: str | None
    method: Literal["boxed", "answer", "fallback", "none"]

    @property
    def fallback(self) -> bool:
        return self.method == "fallback"


def _group_end(text: str, start: int) -> int | None:
    """Index just past the ``}`` that closes the ``{`` at ``start`` (``\\{`` is escaped); None if unclosed."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept whole) or
    brace-less ``\\boxed 5``; a box cut off by the generation limit is skipped for an earlier one."""
    for m in reversed(list(_BOX.finditer(text))):
        start = m.end()
        if text.startswith("{", start):
            end = _group_end(text, start)
            if end is not None:
                return text[start + 1 : end - 1]
        elif bare := _BARE_BOX.match(text, start):
            return bare[0]
    return None


def _clean(text: str) -> str:
    """Strip what a model wraps an answer in: whitespace, ``**``, ``$``, ``\\(...\\)``, a final period."""
    previous = None
    while text != previous:
        previous = text
        text = text.strip().removeprefix("**").removesuffix("**").strip("$").rstrip(".")
        text = text.removeprefix("\\(").removesuffix("\\)").removeprefix("\\[").removesuffix("\\]")
    return text


def _letter(text: str) -> str | None:
    text = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", text).strip()
    m = _WRAPPED_LETTER.match(text) or re.search(r"\(([A-D])\)", text)
    return m[1] if m else None


def _reduce(text: str, kind: Kind) -> str | None:
    """The answer as the kind's grader wants it: a letter for choice, digits for integer when possible."""
    text = _clean(text)
    if kind == "choice":
        return _letter(text)
    if kind == "integer" and re.fullmatch(r"[+-]?\d+", digits := normalize(text)):
        return digits
    return text or None


def _fallback(text: str, kind: Kind) -> str | None:
    if kind == "choice":
        letters = _LETTER.findall(text)
        return "".join(letters[-1]) if letters else None
    numbers = (_INTEGER if kind == "integer" else _NUMBER).findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def answer_section(output: str) -> str | None:
    """The part of ``output`` an answer is read from: after the last ``<|im_start|>answer`` of an s1
    think/answer output; None for a think-format output that never reached its answer (thinking
    text is never graded); the whole output of a plain chat reply."""
    if ANSWER_MARKER in output:
        return output.rsplit(ANSWER_MARKER, 1)[-1]
    if output.lstrip().startswith(THINK_MARKER):
        return None
    return output


def extract(output: str, kind: Kind) -> Extracted:
    """The final answer of ``output``'s answer section (see ``answer_section``): the last box, else an
    ``Answer:`` line (s1's forced ``Final Answer:`` included), else the last number (or letter)."""
    section = answer_section(output)
    if section is None:
        return Extracted(None, "none")
    boxed = last_boxed(section)
    if boxed is not None and (text := _reduce(boxed, kind)):
        return Extracted(text, "boxed")
    lines = (_clean(m["rest"]) for m in reversed(list(_ANSWER.finditer(section))))
    line = next((rest for rest in lines if rest), None)
    if line is not None and (text := _reduce(line, kind)):
        return Extracted(text, "answer")
    if text := _fallback(section, kind):
        return Extracted(text, "fallback")
    return Extracted(None, "none")
