"""Deterministic generator of s1K-1.1-schema reasoning traces and benchmark-shaped eval rows.

Training rows are multi-step arithmetic/algebra word problems whose thinking trajectories read like
DeepSeek-R1 traces: they compute step by step, use the reasoning markers the paper's features fire
on ("Wait,", "Let me check", "Alternatively", "So"), sometimes make a slip and backtrack, and end in a
``\\boxed{}`` answer. Eval rows come in the three benchmark shapes later stages evaluate on: an
integer answer (AIME schema), a LaTeX answer (MATH500 schema) and 4-way multiple choice (GPQA schema).
Everything derives from one ``random.Random(seed)``: the same seed gives byte-identical rows.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from fractions import Fraction

S1K_COLUMNS = (
    "question",
    "solution",
    "cot_type",
    "source_type",
    "metadata",
    "deepseek_thinking_trajectory",
    "deepseek_attempt",
)
"""The s1K-1.1 columns the generator fills (a subset of the dataset's schema, names identical)."""

AIME_COLUMNS = ("id", "problem", "solution", "answer", "url")
MATH_COLUMNS = ("problem", "solution", "answer", "subject", "level", "unique_id")
GPQA_COLUMNS = (
    "Record ID",
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
)

_NAMES = ("Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena")
_ITEMS = (
    ("apples", "baskets"),
    ("books", "shelves"),
    ("marbles", "jars"),
    ("stamps", "albums"),
    ("cookies", "trays"),
    ("pencils", "boxes"),
    ("tiles", "rows"),
    ("seeds", "packets"),
)
_OPENERS = (
    "Okay, so the problem says:",
    "Alright, let me restate the question:",
    "Hmm, here is what is asked:",
    "Let me think about this one:",
)


@dataclass(frozen=True)
class _Problem:
    question: str
    steps: list[tuple[str, int]]  # (description, value) in the order a solver computes them
    answer: int
    template: str


def _rate_problem(rng: random.Random) -> _Problem:
    name = rng.choice(_NAMES)
    item, holder = rng.choice(_ITEMS)
    per, count, extra, given = rng.randint(3, 19), rng.randint(2, 12), rng.randint(1, 40), rng.randint(1, 30)
    total = per * count + extra
    given = min(given, total - 1)
    q = (
        f"{name} fills {count} {holder} with {per} {item} each and then finds {extra} more {item}. "
        f"After giving away {given} {item}, how many {item} does {name} have left?"
    )
    steps = [
        (f"{count} {holder} times {per} {item}", per * count),
        (f"{per * count} plus the {extra} extra", total),
        (f"{total} minus the {given} given away", total - given),
    ]
    return _Problem(q, steps, total - given, "rate")


def _linear_problem(rng: random.Random) -> _Problem:
    x = rng.randint(2, 30)
    a, b = rng.randint(2, 12), rng.randint(1, 60)
    c = a * x + b
    q = f"A number is multiplied by {a} and then increased by {b}; the result is {c}. What is the number?"
    steps = [(f"{c} minus {b}", c - b), (f"{c - b} divided by {a}", x)]
    return _Problem(q, steps, x, "linear")


def _percent_problem(rng: random.Random) -> _Problem:
    price = rng.randint(2, 40) * 20
    pct = rng.choice((10, 15, 20, 25, 30, 40, 50))
    qty = rng.randint(2, 9)
    discount = price * pct // 100
    q = (
        f"A jacket costs {price} dollars. During a sale the price is reduced by {pct} percent. "
        f"How much do {qty} jackets cost during the sale?"
    )
    steps = [
        (f"{pct} percent of {price}", discount),
        (f"{price} minus {discount}", price - discount),
        (f"{qty} jackets at {price - discount} each", qty * (price - discount)),
    ]
    return _Problem(q, steps, qty * (price - discount), "percent")


def _sum_problem(rng: random.Random) -> _Problem:
    n = rng.randint(5, 40)
    k = rng.randint(2, 5)
    total = k * n * (n + 1) // 2
    q = f"What is the sum of all multiples of {k} from {k} up to {k * n}, inclusive?"
    steps = [
        (f"the number of terms, {k * n} divided by {k}", n),
        (f"{n} times {n + 1} over 2", n * (n + 1) // 2),
        (f"{k} times {n * (n + 1) // 2}", total),
    ]
    return _Problem(q, steps, total, "series")


_GENERATORS = (_rate_problem, _linear_problem, _percent_problem, _sum_problem)


def _trajectory(p: _Problem, rng: random.Random) -> str:
    parts = [f"{rng.choice(_OPENERS)} {p.question}", ""]
    for i, (desc, value) in enumerate(p.steps):
        if rng.random() < 0.3:
            slip = value + rng.choice((-10, -2, -1, 1, 2, 10))
            parts.append(f"First, {desc} gives {slip}.")
            parts.append(f"Wait, that doesn't look right. Let me check {desc} again.")
            parts.append(f"Recomputing carefully: {desc} is {value}. Yes, {value}.")
        else:
            lead = "First," if i == 0 else rng.choice(("Then", "Next,", "Now", "So"))
            parts.append(f"{lead} {desc} is {value}.")
        if rng.random() < 0.25:
            parts.append(f"Let me check: going backwards from {value} should undo this step, and it does.")
    if rng.random() < 0.5:
        parts.append(
            f"Alternatively, I could set the whole computation up as one expression and evaluate it; "
            f"that also gives {p.answer}."
        )
    parts.append(f"So the answer should be {p.answer}.")
    if rng.random() < 0.4:
        parts.append(
            "Wait, let me re-read the question to make sure I answered what was asked. Yes, that's it."
        )
    return "\n".join(parts)


def _attempt(p: _Problem) -> str:
    lines = ["We compute step by step."]
    lines += [f"- {desc}: {value}" for desc, value in p.steps]
    lines.append(f"\nTherefore the answer is $\\boxed{{{p.answer}}}$.")
    return "\n".join(lines)


def train_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` s1K-1.1-schema rows (columns: ``S1K_COLUMNS``), deterministic in ``seed``."""
    rng = random.Random(f"lorascope-train-{seed}")
    rows = []
    for i in range(n):
        p = rng.choice(_GENERATORS)(rng)
        rows.append(
            {
                "question": p.question,
                "solution": str(p.answer),
                "cot_type": "math",
                "source_type": "lorascope/synthetic",
                "metadata": json.dumps({"template": p.template, "seed": seed, "index": i}),
                "deepseek_thinking_trajectory": _trajectory(p, rng),
                "deepseek_attempt": _attempt(p),
            }
        )
    return rows


def aime_rows(n: int, seed: int) -> list[dict[str, object]]:
    """Integer-answer rows in the AIME'24 schema; answers are zero-padded to three digits."""
    rng = random.Random(f"lorascope-aime-{seed}")
    rows = []
    for i in range(n):
        p = rng.choice(_GENERATORS)(rng)
        while not 0 <= p.answer <= 999:
            p = rng.choice(_GENERATORS)(rng)
        rows.append(
            {
                "id": 9000 + i,
                "problem": p.question,
                "solution": _attempt(p),
                "answer": f"{p.answer:03d}",
                "url": f"synthetic://aime/{seed}/{i}",
            }
        )
    return rows


def _latex_fraction(f: Fraction) -> str:
    sign = "-" if f < 0 else ""
    return (
        f"{sign}\\frac{{{abs(f.numerator)}}}{{{f.denominator}}}" if f.denominator != 1 else str(f.numerator)
    )


def math_rows(n: int, seed: int) -> list[dict[str, object]]:
    """LaTeX-answer rows in the MATH500 schema: fractions, radicals and ordered pairs."""
    rng = random.Random(f"lorascope-math-{seed}")
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b, c = rng.randint(2, 9), rng.randint(1, 20), rng.randint(1, 20)
            while (c - b) % a == 0:
                c += 1
            frac = Fraction(c - b, a)
            problem = f"Solve for $x$: ${a}x + {b} = {c}$. Express your answer as a common fraction."
            answer, subject = _latex_fraction(frac), "Algebra"
            solution = f"Subtracting {b} gives ${a}x = {c - b}$, so $x = \\boxed{{{answer}}}$."
        elif kind == 1:
            s, r = rng.choice((2, 3, 5, 6, 7)), rng.randint(2, 6)
            problem = f"Simplify $\\sqrt{{{r * r * s}}}$."
            answer, subject = f"{r}\\sqrt{{{s}}}", "Prealgebra"
            solution = (
                f"$\\sqrt{{{r * r * s}}} = \\sqrt{{{r * r}}}\\cdot\\sqrt{{{s}}} = \\boxed{{{answer}}}$."
            )
        else:
            x, y = rng.randint(-9, 9), rng.randint(-9, 9)
            problem = f"Find the point $(x, y)$ with $x + y = {x + y}$ and $x - y = {x - y}$."
            answer, subject = f"({x}, {y})", "Algebra"
            solution = f"Adding the equations gives $2x = {2 * x}$, so the point is $\\boxed{{{answer}}}$."
        rows.append(
            {
                "problem": problem,
                "solution": solution,
                "answer": answer,
                "subject": subject,
                "level": 1 + i % 5,
                "unique_id": f"synthetic/{subject.lower()}/{seed}-{i}.json",
            }
        )
    return rows


def gpqa_rows(n: int, seed: int) -> list[dict[str, object]]:
    """4-way multiple-choice rows in the GPQA schema (choices unshuffled, as in the source CSV)."""
    rng = random.Random(f"lorascope-gpqa-{seed}")
    rows: list[dict[str, object]] = []
    for i in range(n):
        p = rng.choice(_GENERATORS)(rng)
        offsets = rng.sample((-12, -5, -3, -1, 1, 2, 4, 7, 11), 3)
        wrong = [str(p.answer + o) for o in offsets]
        rows.append(
            {
                "Record ID": f"synthetic-{seed}-{i}",
                "Question": p.question,
                "Correct Answer": str(p.answer),
                "Incorrect Answer 1": wrong[0],
                "Incorrect Answer 2": wrong[1],
                "Incorrect Answer 3": wrong[2],
            }
        )
    return rows
