"""Deterministic answer graders (no LLM judge): integer, multiple-choice and LaTeX-math equivalence.

``math_equal`` first compares cheap string normalisations and only then asks ``math_verify`` (sympy),
which is slow to import and to run; the normalisation also covers the few forms it gets wrong.
"""

from __future__ import annotations

import math
import re
import threading
from decimal import Decimal
from typing import Literal

Kind = Literal["integer", "latex", "choice"]
"""How a benchmark's answers are compared: as integers, as LaTeX math, or as a choice letter."""

_INT = re.compile(r"[+-]?\d+(?:\.0*)?")
_DECIMAL = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# \! \, \; \: "\ " \quad \qquad ~ -- but not the second backslash of a "\\" row break
_SPACING = re.compile(r"(?<!\\)\\(?:[!,;:> ]|q?quad(?![a-zA-Z]))|~")
_DELIMS = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])\.?|\\displaystyle")
# keep one space only where it separates a command from a letter ("\cot x"); drop the rest
_SPACE = re.compile(r"(\\[a-zA-Z]+)?\s+(?=([a-zA-Z])?)")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_MONEY = re.compile(r"\\dollar|\\?\$")
_UNIT = re.compile(r"(?<=[\d}])\\(?:text|mbox|textbf|textrm|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?")
_UNWRAP = re.compile(r"\\(?:text|mbox|textbf|textrm|mathrm|mathbf)\{([^{}]*)\}")
_ARG = r"(\{(?:[^{}]|\{[^{}]*\})*\}|\\[a-zA-Z]+|[0-9a-zA-Z])"
_FRAC = re.compile(r"\\[dt]?frac\s*" + _ARG + r"\s*" + _ARG)
_ASSIGN = re.compile(r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?=([^=]+)")
_WORDS = re.compile(r"[a-zA-Z][a-zA-Z ]+")
_BASE = re.compile(r"\w+_\{?(\d+)\}?")


def _as_int(text: str) -> int | None:
    text = text.strip()
    return int(Decimal(text)) if _INT.fullmatch(text) else None


def integer_equal(gold: str, pred: str | None) -> bool:
    """Integer answers (AIME): ``"025" == "25" == "25.0"``; anything non-integer is wrong."""
    if pred is None:
        return False
    g, p = _as_int(gold), _as_int(pred)
    return g is not None and g == p


def choice_equal(gold: str, pred: str | None) -> bool:
    """Multiple-choice letters, case-insensitive; ``"(B)"`` counts as ``"B"``."""
    if pred is None:
        return False
    g, p = (re.sub(r"[\s()]", "", s).upper() for s in (gold, pred))
    return len(g) == 1 and g == p


def _frac(m: re.Match[str]) -> str:
    num, den = (a[1:-1] if a.startswith("{") else a for a in m.groups())
    return rf"\frac{{{num}}}{{{den}}}"


def _space(m: re.Match[str]) -> str:
    command, letter = m.groups()
    return (command or "") + (" " if command and letter else "")


def normalize(latex: str) -> str:
    """Canonical string form of a LaTeX answer: the presentation variants MATH golds and model outputs
    differ by (fraction spellings, spacing, degrees, percent, dollars, units, thousands separators,
    ``x = 5``) collapse to one spelling, so most equal answers compare equal without sympy."""
    s = _SPACING.sub(" ", latex.strip())
    s = _DELIMS.sub("", s)
    s = _SPACE.sub(_space, s.strip())
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _MONEY.sub("", s)
    s = _UNIT.sub("", s)
    s = _UNWRAP.sub(r"\1", s).strip()
    s = _FRAC.sub(_frac, s)
    s = s.rstrip(".").strip()
    s = re.sub(r"^(-?)\.(?=\d)", r"\g<1>0.", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if m := re.fullmatch(r"\(([A-Z])\)", s):
        s = m[1]
    # "x = 5" -> "5" for a value assignment; "y = 2x + 3" is an equation answer and stays whole
    if (m := _ASSIGN.fullmatch(s)) and not re.search(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", m[1])):
        s = m[1]
    return s


def math_equal(gold: str, pred: str | None, timeout_s: float | None = 5) -> bool:
    """LaTeX answer equivalence: equal normal forms, else symbolic comparison by ``math_verify``.

    ``math_verify`` times out with ``signal.alarm``, which only works in the main thread (and only
    in whole seconds); elsewhere it runs without a timeout.
    """
    if pred is None:
        return False
    g, p = normalize(gold), normalize(pred)
    if not p:
        return False
    if g == p:
        return True
    if _WORDS.fullmatch(g):
        return g.casefold() == p.casefold()  # math_verify reads "Evelyn" as a product of six symbols
    if _DECIMAL.fullmatch(g) and _DECIMAL.fullmatch(p):
        return Decimal(g) == Decimal(p)  # math_verify rounds to 6 places: .0000672 == .0000673
    gb, pb = _BASE.fullmatch(g), _BASE.fullmatch(p)
    if gb and pb and gb[1] != pb[1]:
        return False  # math_verify drops base subscripts: 52_8 == 52_9
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    main = threading.current_thread() is threading.main_thread()
    seconds = math.ceil(timeout_s) if timeout_s and main else None
    try:
        gp = parse(f"${g}$", parsing_timeout=seconds)
        pp = parse(f"${p}$", parsing_timeout=seconds)
        return bool(gp and pp and verify(gp, pp, timeout_seconds=seconds))
    except (Exception, TimeoutException):
        return False


def grade(kind: Kind, gold: str, pred: str | None) -> bool:
    """Grade ``pred`` against ``gold`` with the grader for the benchmark's answer kind."""
    if kind == "integer":
        return integer_equal(gold, pred)
    if kind == "choice":
        return choice_equal(gold, pred)
    return math_equal(gold, pred)
