"""Answer extraction and grading, checked against the real MATH500 and AIME 2024 gold answers:
golds must grade equal to themselves and to equivalent rewrites, and unequal to perturbations."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorascope.evaluate.answers import ANSWER_MARKER, Extracted, extract, last_boxed
from lorascope.evaluate.grading import choice_equal, grade, integer_equal, math_equal, normalize

from tests.conftest import SHARED_DATA

BENCHMARKS = SHARED_DATA / "benchmarks"
THINK = "<|im_start|>think\n"


def _golds(name: str) -> list[str]:
    path = BENCHMARKS / name
    if not path.exists():
        pytest.skip(f"shared benchmark file {path} is absent")
    return [json.loads(line)["answer"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def math500() -> list[str]:
    golds = _golds("math500.jsonl")
    assert len(golds) == 500
    return golds


@pytest.fixture(scope="module")
def aime() -> list[str]:
    golds = _golds("aime24.jsonl")
    assert len(golds) == 30
    return golds


def s1(answer_section: str, thinking: str = "Let me work through this carefully.") -> str:
    return f"{THINK}{thinking}\n{ANSWER_MARKER}\n{answer_section}"


def _not_equal(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(gold, pred) for gold, pred in pairs if math_equal(gold, pred)]


def _equal(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(gold, pred) for gold, pred in pairs if not math_equal(gold, pred)]


# --- MATH500: golds against themselves and equivalent rewrites ------------------------------------


def test_every_gold_grades_equal_to_itself_and_through_extraction(math500: list[str]) -> None:
    assert _equal([(g, g) for g in math500]) == []
    extracted = {g: extract(s1(f"The final answer is $\\boxed{{{g}}}$."), "latex") for g in math500}
    assert {e.method for e in extracted.values()} == {"boxed"}
    assert _equal([(g, e.text) for g, e in extracted.items()]) == []


def test_every_normalized_gold_verifies_symbolically(math500: list[str]) -> None:
    """Equal strings never reach math_verify; check each gold also survives the symbolic path."""
    from math_verify import parse, verify

    parsed = [(g, parse(f"${normalize(g)}$")) for g in math500]
    assert [g for g, p in parsed if not (p and verify(p, p))] == []


def test_normalize_is_idempotent_on_golds(math500: list[str]) -> None:
    assert [g for g in math500 if normalize(normalize(g)) != normalize(g)] == []


def test_fraction_spellings_are_equal(math500: list[str]) -> None:
    fractions = [g for g in math500 if "\\frac" in g]
    pairs = [(g, g.replace("\\frac", f"\\{cmd}")) for g in fractions for cmd in ("dfrac", "tfrac")]
    single = re.compile(r"\\frac\{(\d)\}\{(\d)\}")
    shorthand = [g for g in fractions if single.search(g)]
    pairs += [(g, single.sub(r"\\frac\1\2", g)) for g in shorthand]
    pairs += [(g, single.sub(r"\\frac \1 \2", g)) for g in shorthand]
    # a gold that is exactly a fraction with a terminating decimal equals that decimal
    exact = re.compile(r"(-?)\\frac\{(\d+)\}\{(\d+)\}")
    decimals = []
    for g in fractions:
        if m := exact.fullmatch(g):
            value = Decimal(int(m[1] + m[2])) / Decimal(int(m[3]))
            if Fraction(value) == Fraction(int(m[1] + m[2]), int(m[3])):
                decimals.append((g, str(value)))
    assert (len(fractions), len(shorthand), len(decimals)) == (68, 22, 27)
    assert _equal(pairs + decimals) == []
    assert _equal([("\\frac12", "\\dfrac{1}{2}"), ("\\frac12", "0.5"), ("\\tfrac{1}{2}", ".5")]) == []


def test_integer_golds_equal_their_decorated_spellings(math500: list[str]) -> None:
    ints = [g for g in math500 if re.fullmatch(r"-?\d+", g)]
    assert len(ints) >= 300
    pairs = []
    for g in ints:
        n = int(g)
        spellings = [f"{n}.0", f"{n}\\%", f"{n}^\\circ", f"{n}^{{\\circ}}", f"{n} \\text{{ cm}}", f"\\${n}"]
        spellings += [f"x = {n}", f"{n}.", f"$ {n} $"]
        pairs += [(g, s) for s in spellings]
        if abs(n) >= 1000:
            pairs += [(g, f"{n:,}"), (g, f"{n:,}".replace(",", ",\\!"))]
    assert sum(abs(int(g)) >= 1000 for g in ints) >= 15
    assert _equal(pairs) == []


def test_real_gold_rewrites_are_equal(math500: list[str]) -> None:
    polar = "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert polar in math500
    pairs = [(polar, "(3,\\frac{\\pi}{2})"), (polar, "(3, \\pi/2)")]

    degrees = [g for g in math500 if "^\\circ" in g]
    pairs += [(g, g.replace("^\\circ", "")) for g in degrees]
    units = [g for g in math500 if re.search(r"[\d}]\s*\\(?:text|mbox)\{ ", g)]
    pairs += [(g, re.sub(r"\s*\\(?:text|mbox)\{[^}]*\}(\^2)?$", "", g)) for g in units]
    separated = [g for g in math500 if re.search(r"\d,\\!", g)]
    pairs += [(g, re.sub(r"[^\d]", "", g)) for g in separated]
    matrices = [g for g in math500 if "pmatrix" in g]
    pairs += [(g, re.sub(r"\s+", "", g).replace("pmatrix", "bmatrix")) for g in matrices]
    pairs += [(g, re.sub(r"(-?)(\d+)/(\d+)", r"\1\\frac{\2}{\3}", g)) for g in matrices]
    intervals = [g for g in math500 if re.search(r"\\infty|\\cup|[\[\]]", g)]
    pairs += [(g, re.sub(r",\s*", " , ", g)) for g in intervals]
    unions = [g.split(" \\cup ") for g in intervals if "\\cup" in g]
    pairs += [(" \\cup ".join(parts), "\\cup".join(reversed(parts))) for parts in unions]
    radicals = [m for g in math500 if (m := re.fullmatch(r"(\d+)\s*\\sqrt\{?(\d+)\}?", g))]
    pairs += [(m[0], f"\\sqrt{{{int(m[1]) ** 2 * int(m[2])}}}") for m in radicals]

    counts = (len(degrees), len(units), len(separated), len(matrices), len(intervals), len(radicals))
    assert counts == (14, 4, 3, 7, 10, 9) and len(unions) == 3
    pairs += [
        ("x^2+2x+1", "(x+1)^2"),
        ("(a+5)(b+2)", "ab+2a+5b+10"),
        ("x=5", "5"),
        ("5", "k = 5"),
        ("\\text{Evelyn}", "evelyn"),
        ("\\text{(C)}", "C"),
        ("1\\frac{4}{5}", "\\frac95"),
        ("52_8", "52_{8}"),
        ("\\$18.90", "18.9"),
        ("3, 5, 7", "7,5,3"),
        ("\\frac ab", "\\frac{a}{b}"),
        ("\\frac\\pi2", "-\\frac{-\\pi}{2}"),
        ("\\text{east}", "East."),
    ]
    assert _equal(pairs) == []


# --- MATH500: perturbed golds must not grade equal -----------------------------------------------


def _plus_one(gold: str) -> str | None:
    g = normalize(gold)
    if re.fullmatch(r"-?\d+(\.\d+)?", g):
        return str(Decimal(g) + 1)
    if m := re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", g):
        f = Fraction(int(m[1] + m[2]), int(m[3])) + 1
        return f"\\frac{{{f.numerator}}}{{{f.denominator}}}"
    return None


def _digit_changes(gold: str) -> list[str]:
    """Each digit of the normal form bumped by one (mod 10), except in subscripts (number bases)."""
    g = normalize(gold)
    skip = {i for m in re.finditer(r"_\{?\d+\}?", g) for i in range(*m.span())}
    return [
        g[:i] + str((int(c) + 1) % 10) + g[i + 1 :] for i, c in enumerate(g) if c.isdigit() and i not in skip
    ]


def _top_level_split(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for c in text:
        depth += (c in "({[") - (c in ")}]")
        if c == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += c
    return [*parts, current]


def _swapped_tuple(gold: str) -> str | None:
    g = normalize(gold)
    if not re.fullmatch(r"\(.*\)", g) or "\\infty" in g or "\\cup" in g:
        return None
    items = _top_level_split(g[1:-1])
    if len(items) < 2 or items[0] == items[1]:
        return None
    return "(" + ",".join([items[1], items[0], *items[2:]]) + ")"


def _flipped_bracket(gold: str) -> str | None:
    """The first interval bracket whose endpoint is finite, flipped between open and closed."""
    g = normalize(gold)
    if "pmatrix" in g or not re.search(r"\\infty|\\cup|[\[\]]", g):
        return None
    flip = {"(": "[", "[": "(", ")": "]", "]": ")"}
    for i, c in enumerate(g):
        infinite = g[i + 1 :].startswith(("\\infty", "-\\infty")) if c in "([" else g[:i].endswith("\\infty")
        if c in flip and not infinite:
            return g[:i] + flip[c] + g[i + 1 :]
    return None


def test_perturbed_golds_are_not_equal(math500: list[str]) -> None:
    plus_one = [(g, p) for g in math500 if (p := _plus_one(g))]
    digits = [(g, p) for g in math500 for p in _digit_changes(g)]
    swapped = [(g, p) for g in math500 if (p := _swapped_tuple(g))]
    flipped = [(g, p) for g in math500 if (p := _flipped_bracket(g))]
    changed_golds = len({i for i, g in enumerate(math500) if _digit_changes(g)})
    covered = (len(plus_one), changed_golds, len(digits), len(swapped), len(flipped))
    # of 500 golds: 399 numbers, 489 with digits (1142 digit changes), 10 tuples, 10 intervals
    assert covered == (399, 489, 1142, 10, 10)
    others = [("\\text{Evelyn}", "\\text{Navin}"), ("\\text{Evelyn}", "Nevyle"), ("\\text{(C)}", "D")]
    others += [("52_8", "52_9"), ("\\sqrt{51}", "\\sqrt51"), ("5", "5.0000001"), ("y = 2x + 3", "y = 3x + 2")]
    assert _not_equal(plus_one + digits + swapped + flipped + others) == []


# --- AIME: integer answers and extraction from s1-style outputs ----------------------------------


def test_aime_integer_grading(aime: list[str]) -> None:
    padded = [g for g in aime if g.startswith("0")]
    assert len(padded) == 7
    assert all(integer_equal(g, str(int(g))) and integer_equal(g, f"{int(g)}.0") for g in aime)
    assert all(integer_equal(str(int(g)), g) for g in padded)
    assert not any(integer_equal(g, str(int(g) + 1)) or integer_equal(g, f"{int(g)}.5") for g in aime)
    assert not any(integer_equal(g, p) for g in aime for p in (None, "", "x", "\\frac{1}{2}"))


def test_aime_extraction_from_s1_outputs(aime: list[str]) -> None:
    for g in aime:
        n = int(g)
        wrong = n + 1
        thinking = (
            f"Try s = 2.5, so the walk takes {wrong} minutes? That gives \\boxed{{{wrong}}}. Wait, recheck."
        )
        outputs = {
            "boxed": s1(f"Answer: \\boxed{{{n}}}", thinking),
            "answer": s1(f"The walk takes {n} minutes.\n**Answer:** {n}", thinking),
            "fallback": s1(f"So the walk takes {n} minutes in total.", thinking),
        }
        for method, output in outputs.items():
            found = extract(output, "integer")
            assert found == Extracted(str(n), method), (method, output)
            assert grade("integer", g, found.text)
        # thinking that never reached its answer section is not graded, whatever boxes it holds
        assert extract(f"{THINK}\\boxed{{{wrong}}} then \\boxed{{{g}}}", "integer") == Extracted(None, "none")
        # a plain chat reply (a model prompted without the think format) is all answer
        assert extract(f"So \\boxed{{{wrong}}}? No: \\boxed{{{g}}}", "integer") == Extracted(g, "boxed")


def test_extraction_rules() -> None:
    assert last_boxed("\\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("so \\boxed 5$.") == "5"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    # a box cut off by the token limit is skipped for the last complete one
    assert last_boxed("\\boxed{12} and finally \\boxed{\\frac{3}{") == "12"
    assert last_boxed("\\boxed{\\frac{3}{") is None
    truncated = s1("\\boxed{12} hmm, no: \\boxed{\\frac{3}{", "\\boxed{99}")
    assert extract(truncated, "latex") == Extracted("12", "boxed")
    # the integer kind reduces decorated integers but keeps zero padding (graded as integers)
    assert extract("\\boxed{033}", "integer") == Extracted("033", "boxed")
    assert extract("\\boxed{33^\\circ}", "integer") == Extracted("33", "boxed")
    assert extract("\\boxed{1,000}", "integer") == Extracted("1000", "boxed")
    assert extract("\\boxed{\\frac{1}{2}}", "integer") == Extracted("\\frac{1}{2}", "boxed")
    assert extract("Final Answer: $\\frac{3}{4}$.", "latex") == Extracted("\\frac{3}{4}", "answer")
    assert extract("final answer: **x = 7**", "latex") == Extracted("x = 7", "answer")
    assert extract("**Answer:**\n\nthe total is 1,024 apples", "integer") == Extracted("1024", "fallback")
    assert extract("we get 3.5 then 12 then 7.25", "integer") == Extracted("12", "fallback")
    assert extract("so x = -3/4.", "latex") == Extracted("-3/4", "fallback")
    assert extract("and 0.75 remains", "latex") == Extracted("0.75", "fallback")
    # an empty box does not count as an answer
    assert extract("\\boxed{} Answer: 4", "integer") == Extracted("4", "answer")
    nothing = extract(s1("I could not finish the computation.", "\\boxed{5}"), "integer")
    assert nothing == Extracted(None, "none")
    assert not nothing.fallback
    assert not grade("integer", "5", nothing.text)
    methods = [extract(o, "integer") for o in ("\\boxed{1}", "Answer: 2", "about 3", "none", "is 4")]
    assert [e.method for e in methods] == ["boxed", "answer", "fallback", "none", "fallback"]
    assert sum(e.fallback for e in methods) == 2


def test_choice_extraction_and_grading() -> None:
    cases = {
        "The correct answer is (C).": Extracted("C", "answer"),
        "Therefore \\boxed{B}": Extracted("B", "boxed"),
        "\\boxed{\\text{(C)}}": Extracted("C", "boxed"),
        "\\boxed{(A)}": Extracted("A", "boxed"),
        "\\boxed{D. 42}": Extracted("D", "boxed"),
        s1("Answer: D", "\\boxed{A}"): Extracted("D", "answer"),
        "Answer: B) the second one": Extracted("B", "answer"),
        "**Answer: C**": Extracted("C", "answer"),
        "Between the options I pick (B) since it fits.": Extracted("B", "fallback"),
        "\\boxed{42}, which is option C": Extracted("C", "fallback"),
        "no letter here": Extracted(None, "none"),
    }
    assert {o: extract(o, "choice") for o in cases} == cases
    assert choice_equal("C", "C") and choice_equal("C", "c") and choice_equal("b", "(B)")
    assert not choice_equal("C", "D") and not choice_equal("C", None) and not choice_equal("C", "CD")
    assert grade("choice", "A", extract("The correct answer is (A)", "choice").text)


def test_grade_dispatch_and_none() -> None:
    assert grade("integer", "025", "25") and not grade("integer", "025", "26")
    assert grade("choice", "C", "c") and not grade("choice", "C", "B")
    assert grade("latex", "\\frac12", "0.5") and not grade("latex", "\\frac12", "0.6")
    assert not any(grade(kind, "1", None) for kind in ("integer", "choice", "latex"))
    assert not math_equal("1", "") and not math_equal("1", "   ")


def test_math_equal_off_the_main_thread() -> None:
    """math_verify's signal timeouts raise outside the main thread; grading must still work there."""
    pairs = [
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("x^2+2x+1", "(x+1)^2", True),
        ("2\\sqrt{2}", "\\sqrt{7}", False),
    ]
    with ThreadPoolExecutor(1) as pool:
        results = list(pool.map(lambda p: math_equal(p[0], p[1]), pairs))
    assert results == [expected for *_, expected in pairs]


# --- properties ----------------------------------------------------------------------------------

_PLAIN = st.text(st.characters(blacklist_characters="\\{}", blacklist_categories=("Cs",)), max_size=8)
_BALANCED = st.recursive(
    st.lists(st.one_of(_PLAIN, st.sampled_from(["\\{", "\\}", "\\frac", "\\sqrt"])), max_size=4).map("".join),
    lambda inner: st.lists(st.one_of(_PLAIN, inner.map(lambda s: "{" + s + "}")), max_size=4).map("".join),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(prefix=st.text(max_size=30), content=_BALANCED, suffix=st.text(max_size=30))
def test_last_boxed_finds_the_last_box(prefix: str, content: str, suffix: str) -> None:
    if "\\boxed" in suffix or "\\fbox" in suffix:
        suffix = ""
    assert last_boxed(prefix + "\\boxed{" + content + "}" + suffix) == content


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 10**6), width=st.integers(1, 8), noise=st.integers(0, 999))
def test_integer_answers_survive_extraction(n: int, width: int, noise: int) -> None:
    gold = f"{n:0{width}d}"
    output = s1(f"Answer: $\\boxed{{{n:,}}}$", f"maybe {noise}? \\boxed{{{noise}}}")
    found = extract(output, "integer")
    assert found.method == "boxed" and integer_equal(gold, found.text)
    assert integer_equal(gold, str(n)) and not integer_equal(gold, str(n + 1))


def test_a_pathological_prediction_returns_within_the_timeout() -> None:
    """math_verify takes minutes on a tower of powers (sympy evaluates it); the grading timeout must cut it:
    each of parse, parse, verify gets `timeout_s` (1 s here), so the answer comes back in seconds, graded
    wrong. Run in a child process (signal timeouts need its main thread) with a hard limit of its own, so a
    lost guard fails the test instead of hanging the suite."""
    code = (
        "import time; from lorascope.evaluate.grading import math_equal\n"
        "t = time.perf_counter()\n"
        "print(math_equal('1', '9^{9^{9^{9}}}', 1), math_equal('1', '10^{10^{10}}', 1), time.perf_counter() - t)\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("math_equal ran past 60 s on a pathological prediction: the timeout guard is gone")
    first, second, seconds = done.stdout.split()
    assert (first, second) == ("False", "False") and float(seconds) < 20, done.stdout
