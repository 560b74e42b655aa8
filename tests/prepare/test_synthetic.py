"""The synthetic generator: deterministic, in the s1K-1.1 schema, answers that check out."""

from __future__ import annotations

import re
from fractions import Fraction

from lorascope.prepare import synthetic

# The columns of simplescaling/s1K-1.1 (its dataset card / parquet schema).
S1K_1_1_SCHEMA = {
    "solution",
    "question",
    "cot_type",
    "source_type",
    "metadata",
    "gemini_thinking_trajectory",
    "gemini_attempt",
    "deepseek_thinking_trajectory",
    "deepseek_attempt",
    "gemini_grade",
    "gemini_grade_reason",
    "deepseek_grade",
    "deepseek_grade_reason",
}


def test_same_seed_same_rows_other_seed_other_rows():
    assert synthetic.train_rows(20, 3) == synthetic.train_rows(20, 3)
    assert synthetic.train_rows(20, 3) != synthetic.train_rows(20, 4)
    for gen in (synthetic.aime_rows, synthetic.math_rows, synthetic.gpqa_rows):
        assert gen(6, 1) == gen(6, 1) and gen(6, 1) != gen(6, 2)


def test_columns_are_s1k_columns():
    rows = synthetic.train_rows(5, 0)
    assert all(tuple(r) == synthetic.S1K_COLUMNS for r in rows)
    assert set(synthetic.S1K_COLUMNS) <= S1K_1_1_SCHEMA
    assert {"question", "solution", "deepseek_thinking_trajectory", "deepseek_attempt"} <= set(
        synthetic.S1K_COLUMNS
    )


def test_traces_carry_reasoning_markers_and_boxed_answers():
    rows = synthetic.train_rows(200, 0)
    traces = "\n".join(r["deepseek_thinking_trajectory"] for r in rows)
    for marker in ("Wait,", "Let me check", "Alternatively", "So "):
        assert traces.count(marker) >= 20, marker
    for r in rows:
        boxed = re.findall(r"\\boxed\{(-?\d+)\}", r["deepseek_attempt"])
        assert boxed == [r["solution"]]
        # the trace ends on the same answer the attempt boxes
        assert f"So the answer should be {r['solution']}." in r["deepseek_thinking_trajectory"]


def test_linear_problems_are_solvable():
    """Re-solve the 'multiplied by a, increased by b, result c' problems independently."""
    pattern = re.compile(r"multiplied by (\d+) and then increased by (\d+); the result is (\d+)")
    seen = 0
    for r in synthetic.train_rows(200, 1):
        if m := pattern.search(r["question"]):
            a, b, c = map(int, m.groups())
            assert (c - b) / a == int(r["solution"])
            seen += 1
    assert seen > 10


def test_eval_rows_in_benchmark_shapes():
    aime = synthetic.aime_rows(12, 0)
    assert all(tuple(r) == synthetic.AIME_COLUMNS for r in aime)
    assert all(re.fullmatch(r"\d{3}", r["answer"]) for r in aime)
    assert all(f"\\boxed{{{int(r['answer'])}}}" in r["solution"] for r in aime)

    for r in synthetic.math_rows(12, 0):
        assert tuple(r) == synthetic.MATH_COLUMNS
        assert f"\\boxed{{{r['answer']}}}" in r["solution"]
        if m := re.search(r"\$(\d+)x \+ (\d+) = (\d+)\$", r["problem"]):
            a, b, c = map(int, m.groups())
            sign, num, den = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", r["answer"]).groups()
            assert Fraction(int(sign + num), int(den)) == Fraction(c - b, a)

    for r in synthetic.gpqa_rows(12, 0):
        assert tuple(r) == synthetic.GPQA_COLUMNS
        choices = [
            r["Correct Answer"],
            r["Incorrect Answer 1"],
            r["Incorrect Answer 2"],
            r["Incorrect Answer 3"],
        ]
        assert len(set(choices)) == 4
