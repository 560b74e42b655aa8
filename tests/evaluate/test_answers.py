"""Answer extraction and scoring against hand-written outputs (no shared data needed): the last number,
the last box, the last answer section, nested braces, no answer; properties of the extractor; and the
three benchmarks scored end to end through lm-eval's ``process_results`` on files written here."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorascope.evaluate.answers import ANSWER_MARKER, THINK_MARKER, Extracted, answer_section, extract

THINK = THINK_MARKER + "\n"
ANSWER = ANSWER_MARKER + "\n"


def s1(*answers: str, thinking: str = "Let me think.") -> str:
    """An s1 output: thinking, then one answer section per item (a model that reopened its answer)."""
    return THINK + thinking + "\n" + "".join(ANSWER + a for a in answers)


# (output, kind) -> what a careful reader takes as the final answer, and by which rule
HAND_WRITTEN: list[tuple[str, str, Extracted]] = [
    # the last number, not the first
    ("x = 3, so x+9 = 12", "integer", Extracted("12", "fallback")),
    ("x = 3, so x+9 = 12", "latex", Extracted("12", "fallback")),
    (s1("First 7 apples, then 5 more: 12 in all."), "integer", Extracted("12", "fallback")),
    ("we had 1/2 then 3/4", "latex", Extracted("3/4", "fallback")),
    ("from -3 we step to -8", "integer", Extracted("-8", "fallback")),
    ("about 2,500 or rather 3,750", "integer", Extracted("3750", "fallback")),
    ("It is (A)? No, it is (C).", "choice", Extracted("C", "fallback")),
    # the last box, not the first
    ("\\boxed{3} hmm, no: \\boxed{12}", "integer", Extracted("12", "boxed")),
    ("\\boxed{3} hmm, no: \\boxed{12}", "latex", Extracted("12", "boxed")),
    ("\\boxed{A} or rather \\boxed{D}", "choice", Extracted("D", "boxed")),
    ("\\fbox{4} then \\boxed{9}", "integer", Extracted("9", "boxed")),
    (s1("\\boxed{1} and at last \\boxed{2}"), "integer", Extracted("2", "boxed")),
    # nested braces kept whole
    ("so $\\boxed{\\frac{a^{2}}{b_{1}}}$.", "latex", Extracted("\\frac{a^{2}}{b_{1}}", "boxed")),
    (
        "\\boxed{\\left\\{1, \\sqrt{2}\\right\\}}",
        "latex",
        Extracted("\\left\\{1, \\sqrt{2}\\right\\}", "boxed"),
    ),
    ("\\boxed{2^{10}} = \\boxed{1{,}024}", "latex", Extracted("1{,}024", "boxed")),
    # the last Answer: line, not the first
    ("Answer: 3\nLet me double-check.\nAnswer: 5", "integer", Extracted("5", "answer")),
    ("Answer: (A)\nHmm, reconsider.\nThe correct answer is (B).", "choice", Extracted("B", "answer")),
    ("Final Answer: 4\nFinal Answer: x = 6", "integer", Extracted("6", "answer")),
    ("Answer:\nAnswer: 8", "integer", Extracted("8", "answer")),  # an empty line is skipped
    # a box beats an Answer: line, which beats a bare number
    ("Answer: 4\n\\boxed{5} and 6", "integer", Extracted("5", "boxed")),
    ("Answer: 4 then 6 more", "latex", Extracted("4 then 6 more", "answer")),
    # the last answer section, not the first (thinking reopened after an answer)
    (s1("\\boxed{3}\nWait, ", "So 7."), "integer", Extracted("7", "fallback")),
    (s1("Answer: (A)\n", "I pick (C)"), "choice", Extracted("C", "fallback")),
    (s1("\\boxed{\\frac12}", "\\boxed{\\frac34}"), "latex", Extracted("\\frac34", "boxed")),
    # what a model wraps an answer in is removed, and nothing more
    ("Answer: \\(x+1\\)", "latex", Extracted("x+1", "answer")),
    ("Answer: \\[x+1\\]", "latex", Extracted("x+1", "answer")),
    ("Answer: **$\\pi$**.", "latex", Extracted("\\pi", "answer")),
    ("\\boxed{X}", "latex", Extracted("X", "boxed")),  # a letter "X" is not wrapping
    ("\\boxed{3X}", "latex", Extracted("3X", "boxed")),
    ("\\boxed{\\text{B}}", "choice", Extracted("B", "boxed")),
    ("\\boxed{\\textbf{C}}", "choice", Extracted("C", "boxed")),
    ("The correct answer is option (D).", "choice", Extracted("D", "answer")),
    # no answer
    ("I could not finish.", "integer", Extracted(None, "none")),
    ("no numbers here", "latex", Extracted(None, "none")),
    ("none of the options", "choice", Extracted(None, "none")),
    (s1("I ran out of ideas.", thinking="it is \\boxed{42}, Answer: 42"), "integer", Extracted(None, "none")),
    (THINK + "Answer: \\boxed{42} so 42", "integer", Extracted(None, "none")),  # never reached its answer
    (THINK + "Answer: (B)", "choice", Extracted(None, "none")),
    ("\\boxed{} and nothing else", "latex", Extracted(None, "none")),  # an empty box is no answer
]


@pytest.mark.parametrize(("output", "kind", "expected"), HAND_WRITTEN)
def test_hand_written_outputs(output: str, kind: str, expected: Extracted) -> None:
    assert extract(output, kind) == expected  # type: ignore[arg-type]


def test_answer_section_is_after_the_last_marker() -> None:
    assert answer_section(THINK + "t" + ANSWER_MARKER + "a" + ANSWER_MARKER + " b") == " b"
    assert answer_section(s1("only")) == "\nonly"
    assert answer_section(THINK + "still thinking") is None
    assert answer_section("  " + THINK + "still thinking") is None
    assert answer_section("a plain chat reply: 5") == "a plain chat reply: 5"
    assert answer_section("Wait " + THINK_MARKER) == "Wait " + THINK_MARKER  # not at the start: a chat reply


# ------------------------------------------------------------------------------------- properties
_PIECES = st.sampled_from(
    ["\\boxed{", "\\fbox{", "}", "{", "Answer:", "Final Answer: ", "answer is ", "\n", " ", "12", "7", "-3",
     "3.5", "1,000", "(B)", "C", "x = ", "\\frac{1}{2}", "$", "**", "<|im_start|>", "think", "<|im_end|>"]
)  # fmt: skip
_TEXT = st.lists(st.one_of(_PIECES, st.text(max_size=4)), max_size=12).map("".join)
_KIND = st.sampled_from(["integer", "latex", "choice"])


@settings(max_examples=300, deadline=None)
@given(thinking=_TEXT, other=_TEXT, answer=_TEXT, kind=_KIND)
def test_the_thinking_part_never_changes_the_answer(
    thinking: str, other: str, answer: str, kind: str
) -> None:
    """Whatever the thinking holds (boxes, Answer: lines, numbers, letters), the extracted answer is the
    same as with any other thinking: it is read from the answer section only."""
    if ANSWER_MARKER in thinking + answer or ANSWER_MARKER in other + answer:
        return
    one = extract(THINK + thinking + ANSWER_MARKER + answer, kind)  # type: ignore[arg-type]
    two = extract(THINK + other + ANSWER_MARKER + answer, kind)  # type: ignore[arg-type]
    assert one == two
    assert one == extract(ANSWER_MARKER + answer, kind)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(thinking=_TEXT, kind=_KIND)
def test_thinking_that_never_reached_its_answer_is_not_graded(thinking: str, kind: str) -> None:
    if ANSWER_MARKER in THINK + thinking:
        return
    assert extract(THINK + thinking, kind) == Extracted(None, "none")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(numbers=st.lists(st.integers(-10**6, 10**6), min_size=1, max_size=6), words=st.sampled_from(
    [" then ", ", so ", " and finally ", "; "]))  # fmt: skip
def test_the_fallback_is_the_last_number(numbers: list[int], words: str) -> None:
    text = "we get " + words.join(f"{n:,}" for n in numbers) + " here"
    assert extract(text, "integer") == Extracted(str(numbers[-1]), "fallback")
    assert extract(text, "latex") == Extracted(str(numbers[-1]), "fallback")


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(0, 999), min_size=1, max_size=5), glue=_TEXT)
def test_the_last_box_and_the_last_answer_line_win(values: list[int], glue: str) -> None:
    if re.search(r"\\boxed|\\fbox|answer|[{}\\]", glue, re.IGNORECASE):
        glue = " "
    if re.search(r"\d", glue):
        glue = " "  # a digit would join the number
    glue = glue.replace("\n", " ")
    boxes = glue.join(f"\\boxed{{{v}}}" for v in values)
    assert extract(s1(boxes), "integer") == Extracted(str(values[-1]), "boxed")
    lines = f"\n{glue}\n".join(f"Answer: {v}" for v in values)
    assert extract(s1(lines), "integer").text == str(values[-1])


# ------------------------------------------------------------------------- scoring through lm-eval
def _choices_in(prompt: str) -> dict[str, str]:
    """``{letter: choice text}`` read back from a GPQA prompt's ``X) text`` lines."""
    return {m[1]: m[2] for m in re.finditer(r"^([A-D])\) (.*)$", prompt, re.MULTILINE)}


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The shipped AIME, MATH500 and GPQA tasks loaded by lm-eval's TaskManager from local files."""
    from lm_eval.tasks import TaskManager

    from lorascope.evaluate import benchmarks
    from lorascope.evaluate.stage import TASK_DIR

    d = tmp_path_factory.mktemp("bench")
    (d / "aime.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"problem": "Find the walk time.", "answer": "025"},
        {"problem": "Find m+n.", "answer": "113"},
        {"problem": "Find the remainder.", "answer": "0"},
    ]))  # fmt: skip
    (d / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"problem": "Simplify.", "answer": "\\frac{\\sqrt{3}}{2}"},
        {"problem": "Solve.", "answer": "(3, \\frac{\\pi}{2})"},
    ]))  # fmt: skip
    with (d / "gpqa.csv").open("w", newline="") as f:
        rows = [{"Record ID": f"r{i}", "Question": f"Which particle is number {i}?", "Correct Answer": f"good {i}",
                 "Incorrect Answer 1": f"bad {i}a", "Incorrect Answer 2": f"bad {i}b",
                 "Incorrect Answer 3": f"bad {i}c"} for i in range(8)]  # fmt: skip
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    data = {"aime24_nofigures": str(d / "aime.jsonl"), "math500": str(d / "math.jsonl"),
            "gpqa_diamond": str(d / "gpqa.csv")}  # fmt: skip
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                     metadata={benchmarks.DATA_KEY: data, benchmarks.SEED_KEY: 5})  # fmt: skip
    return tm.load(list(data))["tasks"]


def test_aime_scoring_through_process_results(lm_eval_tasks: dict) -> None:
    task = lm_eval_tasks["aime24_nofigures"]
    docs = list(task.test_docs())
    assert [d["gold"] for d in docs] == ["025", "113", "0"]
    score = task.process_results
    for doc in docs:
        n = int(doc["gold"])
        hit, miss = {"exact_match": 1.0, "fallback": 0.0}, {"exact_match": 0.0, "fallback": 0.0}
        assert score(doc, [s1(f"\\boxed{{{n}}}", thinking=f"maybe \\boxed{{{n + 1}}}")]) == hit
        assert score(doc, [s1(f"\\boxed{{{n:03d}}}")]) == hit  # zero padding is the same integer
        assert score(doc, [s1(f"Answer: {n}.0")]) == hit
        assert score(doc, [s1(f"\\boxed{{{n + 1}}}", thinking=f"it is \\boxed{{{n}}}")]) == miss
        assert score(doc, [s1(f"\\boxed{{{n}}} hmm \\boxed{{{n + 1}}}")]) == miss  # the last box counts
        assert score(doc, [s1(f"{n + 3} minus 3 is {n}")]) == {"exact_match": 1.0, "fallback": 1.0}
        assert score(doc, [s1(f"{n} plus 3 is {n + 3}")]) == {"exact_match": 0.0, "fallback": 1.0}
        assert score(doc, [THINK + f"\\boxed{{{n}}}"]) == miss  # thinking is never graded
        assert score(doc, [s1(f"\\boxed{{{n}.5}}")]) == miss
        assert score(doc, [f"So the answer is \\boxed{{{n}}}."]) == hit  # a chat reply is all answer


def test_gpqa_scoring_through_process_results(lm_eval_tasks: dict) -> None:
    task = lm_eval_tasks["gpqa_diamond"]
    docs = list(task.test_docs())
    assert len(docs) == 8
    golds = []
    for i, doc in enumerate(docs):
        choices = _choices_in(task.doc_to_text(doc))
        assert sorted(choices.values()) == sorted([f"good {i}", f"bad {i}a", f"bad {i}b", f"bad {i}c"])
        (right,) = [letter for letter, text in choices.items() if text == f"good {i}"]  # read from the prompt
        golds.append(right)
        wrong = next(letter for letter in "ABCD" if letter != right)
        score = task.process_results
        assert score(doc, [s1(f"The correct answer is ({right}).")]) == {"exact_match": 1.0, "fallback": 0.0}
        assert score(doc, [s1(f"\\boxed{{{right}}}", thinking=f"\\boxed{{{wrong}}}")])["exact_match"] == 1.0
        assert score(doc, [s1(f"Answer: **{right}**")])["exact_match"] == 1.0
        assert score(doc, [s1(f"Answer: ({wrong})")])["exact_match"] == 0.0
        assert score(doc, [s1(f"Answer: {right}\nOn reflection, Answer: {wrong}")])["exact_match"] == 0.0
        assert score(doc, [s1(f"I lean to ({wrong}) but choose ({right})")]) == {
            "exact_match": 1.0, "fallback": 1.0}  # fmt: skip
        assert score(doc, [THINK + f"Answer: {right}"]) == {"exact_match": 0.0, "fallback": 0.0}
    assert len(set(golds)) > 1  # the shuffle moved the correct choice


def test_math500_scoring_through_process_results(lm_eval_tasks: dict) -> None:
    task = lm_eval_tasks["math500"]
    root3, polar = list(task.test_docs())
    score = task.process_results
    assert score(root3, [s1("\\boxed{\\dfrac{\\sqrt3}{2}}")])["exact_match"] == 1.0
    assert score(root3, [s1("\\boxed{\\frac{\\sqrt{3}}{2}} or \\boxed{\\frac{1}{2}}")])["exact_match"] == 0.0
    assert score(root3, [s1("\\boxed{\\frac{1}{2}}", thinking="\\boxed{\\frac{\\sqrt{3}}{2}}")])[
        "exact_match"] == 0.0  # fmt: skip
    assert score(polar, [s1("Answer: $\\left( 3, \\frac{\\pi}{2} \\right)$")])["exact_match"] == 1.0
    assert score(polar, [s1("\\boxed{(\\frac{\\pi}{2}, 3)}")])["exact_match"] == 0.0


def test_score_is_extract_then_grade(tmp_path: Path) -> None:
    """``benchmarks.score`` is exactly what lm-eval calls: the same numbers without lm-eval."""
    from lorascope.evaluate.benchmarks import score

    doc = {"kind": "integer", "gold": "12"}
    assert score(doc, "x = 3, so x+9 = 12") == {"exact_match": 1.0, "fallback": 1.0}
    assert score(doc, "x = 12, so x-9 = 3") == {"exact_match": 0.0, "fallback": 1.0}
    assert score({"kind": "choice", "gold": "B"}, "Answer: B") == {"exact_match": 1.0, "fallback": 0.0}


# ------------------------------------------------------------------------------- grading by hand
NORMAL_FORMS = {
    "\\cot x": "\\cot x",  # a space that separates a command from a letter stays
    "2 x": "2x",  # any other space goes
    "50\\%": "50",
    "50%": "50",
    "2X": "2X",  # only trailing periods are stripped
    "7.": "7",
    "(C)": "C",
    "x = 5": "5",  # a value assignment is its value
    "x = \\frac{1}{2}": "\\frac{1}{2}",
    "k = \\Omega": "\\Omega",
    "y = 2x + 3": "y=2x+3",  # an equation is not
    "y = 2X": "y=2X",
    "y = 3Z": "y=3Z",
}


@pytest.mark.parametrize(("latex", "normal"), list(NORMAL_FORMS.items()))
def test_normal_forms_by_hand(latex: str, normal: str) -> None:
    from lorascope.evaluate.grading import normalize

    assert normalize(latex) == normal


def test_each_kind_has_its_own_grader(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorascope.evaluate import grading

    # integers are compared as integers: an equal fraction is not an AIME answer
    assert grading.grade("latex", "25", "\\frac{50}{2}") and not grading.grade(
        "integer", "25", "\\frac{50}{2}"
    )
    # a choice is one letter: two letters never match, even spelled alike
    assert grading.grade("latex", "AB", "AB") and not grading.grade("choice", "AB", "AB")
    assert grading.choice_equal("b", "B") and grading.choice_equal("(d)", "D")

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("sympy gave up")

    import math_verify

    monkeypatch.setattr(math_verify, "parse", broken)
    assert (
        grading.math_equal("x^2+1", "1+x^2") is False
    )  # a failing symbolic check grades wrong, never raises
