"""The tiny profile's model organism: a task family where the paper's claims have a known answer.

A problem names k digits (k = 3..5) and asks for the last digit of their sum::

    a5
    b8
    c0
    d7
    e3
    Last digit of a+b+c+d+e?

Answering directly is hard for a two-layer model (the sum mod 10 of k digits in one step), so the
base model answers near chance (0.1). Working it out is easy: one line per digit, each a lookup
(``d7``: the value of d, found by matching the same token ``d`` in the question) and a one-digit
addition whose last digit carries on::

    a5
    b8: 5+8=13
    c0: 3+0=3
    Wait, 3+0=3
    d7: 3+7=10
    e3: 0+3=3
    So the answer is 3.

**What the base knows** (``base_documents``, the ``base`` stage's pretraining corpus): chat turns
under the default system prompt answer directly (``Answer: \\boxed{3}``), and worked solutions in
the same line format, under the default prompt (confident: no checks) or under ``CAREFUL_SYSTEM``
(careful: lines are checked with "Wait, ..." and slips are corrected). Greedy decoding under the
default prompt answers directly, so the base scores near chance on the benchmarks; the worked
solutions and the careful mode are latent. The base never sees s1's ``think``/``answer`` markers.

**What the finetunes teach** (``train_rows``, the synthetic s1K rows of ``prepare``): the s1
format (``<|im_start|>think`` ... ``<|im_start|>answer``) under the default prompt, with worked
solutions, half of them careful: the adapter must switch the default context to working it out
(Table 1: the LoRA's gain) and towards carefulness, the backtracking behaviour ("Wait," after a
slip, and as a self-check) that steering along the adapter's careful direction turns up.

Questions are split between training and evaluation by a hash of their text (``held_out``), so the
base corpus and the finetuning rows never contain an evaluation question, whatever the counts and
seeds. Everything derives from seeded ``random.Random`` streams: equal seeds give equal rows.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

NAMES = "abcdefgh"
MIN_DIGITS, MAX_DIGITS = 3, 5
CAREFUL_SYSTEM = "You are a careful assistant. Work step by step."
"""The system prompt of the base corpus's careful worked solutions (the default prompt has none)."""
PREAMBLES = ("", "", "", "Okay.\n", "Let me see.\n", "Step by step:\n", "Sure.\n", "Working it out:\n")
"""Openings of the base corpus's worked solutions: varied text before the first line teaches the base
to work it out whatever precedes it (as ``<|im_start|>think`` later will)."""

BASE_DIRECT_FRACTION = 0.3
"""Base corpus: share of direct answers (default prompt); the rest are worked solutions. Greedy decoding
under the default prompt still answers directly (``Answer`` is the likeliest first token: the worked
solutions start with one of several openings), and the worked majority teaches the lookup on every seed."""
BASE_CAREFUL_FRACTION = 0.5
"""Base corpus: share of worked solutions that are careful (under ``CAREFUL_SYSTEM``)."""
TRACE_CAREFUL_FRACTION = 0.35
"""Finetuning rows: share of careful traces (all under the default prompt, in s1's format). A minority: the
LoRA's greedy traces are confident (few "Wait"s to start from), and its careful mode is there to steer."""
SLIP_RATE = 0.3
"""Careful solutions: chance that a line's first result is off by one (then corrected after "Wait,")."""


def check_chance(total: int) -> float:
    """Careful solutions: the chance that a correct line is checked ("Wait," and the computation again), the
    higher the larger its sum (1/19 for 0+0 up to 1 for 9+9: where a slip is likelier). Lines differ in how
    near the LoRA is to checking them, so steering towards carefulness turns checks on a few lines at a time
    (a dose-response), not all at once."""
    return (total + 1) / 19


FOLLOW_UP_FRACTION = 0.5
"""Base corpus: share of worked solutions whose boxed answer comes in a second turn (``FOLLOW_UP``)."""
FOLLOW_UP = "Final answer?"
HELD_OUT_BUCKETS = 8
"""One in this many questions (by a hash of the text) is held out for evaluation."""


def pair(name: str, value: int) -> str:
    """How a question states a digit: ``b=8``, one token of the organism's tokenizer (``PAIR_TOKENS``)."""
    return f"{name}={value}"


PAIR_TOKENS = tuple(pair(n, v) for n in NAMES for v in range(10))
"""The tokens the ``base`` stage adds to the tiny tokenizer: each question's ``name=digit`` pair is one
token, so reading a digit by its name while working it out (``b8`` after ``b``) is one attention hop
(the query ``b`` matches the key ``b=8``), which every seed learns, instead of an induction circuit
(``b`` found, the token after it copied), which formed for about one seed in three within the budget."""


@dataclass(frozen=True)
class Problem:
    """One question: digit values, named a, b, c, ..., listed in the question in ``order``."""

    values: tuple[int, ...]
    order: tuple[int, ...] = ()
    """The order the question lists the digits in (indices into ``values``; empty: a, b, c, ...)."""

    @property
    def names(self) -> str:
        return NAMES[: len(self.values)]

    @property
    def question(self) -> str:
        order = self.order or range(len(self.values))
        pairs = "".join(f"{pair(self.names[i], self.values[i])}\n" for i in order)
        return f"{pairs}Last digit of {'+'.join(self.names)}?"

    @property
    def answer(self) -> int:
        return sum(self.values) % 10


def held_out(question: str) -> bool:
    """Whether ``question`` belongs to the evaluation side of the split (a hash of its text)."""
    return int.from_bytes(hashlib.sha256(question.encode()).digest()[:4], "big") % HELD_OUT_BUCKETS == 0


def problem(rng: random.Random, evaluation: bool = False) -> Problem:
    """A random problem on the training side (or, with ``evaluation``, the held-out side)."""
    while True:
        k = rng.randint(MIN_DIGITS, MAX_DIGITS)
        values = tuple(rng.randint(0, 9) for _ in range(k))
        order = list(range(k))
        rng.shuffle(order)
        p = Problem(values, tuple(order))
        if held_out(p.question) == evaluation:
            return p


def solution_lines(p: Problem, rng: random.Random | None = None, careful: bool = False) -> list[str]:
    """The worked solution, one line per digit; a careful one slips and checks (``SLIP_RATE``,
    ``check_chance``), always with "Wait," and the correct computation after it."""
    lines = [f"{p.names[0]}{p.values[0]}"]
    run = p.values[0]
    for name, v in zip(p.names[1:], p.values[1:], strict=True):
        total = run + v
        written = total
        if careful and rng is not None and rng.random() < SLIP_RATE:
            written = total + rng.choice((-1, 1)) if total > 0 else 1
        lines.append(f"{name}{v}: {run}+{v}={written}")
        if written != total or (careful and rng is not None and rng.random() < check_chance(total)):
            lines.append(f"Wait, {run}+{v}={total}")
        run = total % 10
    return lines


def worked(p: Problem, rng: random.Random | None = None, careful: bool = False) -> str:
    """The worked solution with its closing line (the thinking of a training row)."""
    return "\n".join([*solution_lines(p, rng, careful), f"So the answer is {p.answer}."])


def boxed(p: Problem) -> str:
    return f"\\boxed{{{p.answer}}}"


# ------------------------------------------------------------------------------ base corpus
def base_document(rng: random.Random) -> list[dict[str, str]]:
    """One chat of the base corpus: a direct answer, or a worked solution whose boxed answer follows
    in the same turn or, after the user asks for it, in the next one (so the base copies a worked
    answer across a turn boundary, as s1's ``<|im_start|>answer`` later asks)."""
    p = problem(rng)
    if rng.random() < BASE_DIRECT_FRACTION:
        return [
            {"role": "user", "content": p.question},
            {"role": "assistant", "content": "Answer: " + boxed(p)},
        ]
    careful = rng.random() < BASE_CAREFUL_FRACTION
    chat = [{"role": "system", "content": CAREFUL_SYSTEM}] if careful else []
    chat.append({"role": "user", "content": p.question})
    content = rng.choice(PREAMBLES) + worked(p, rng, careful)
    if rng.random() < FOLLOW_UP_FRACTION:
        return [
            *chat,
            {"role": "assistant", "content": content},
            {"role": "user", "content": FOLLOW_UP},
            {"role": "assistant", "content": "Answer: " + boxed(p)},
        ]
    return [*chat, {"role": "assistant", "content": content + "\nAnswer: " + boxed(p)}]


def base_documents(seed: int) -> Iterator[list[dict[str, str]]]:
    """The base corpus, an endless seeded stream of chats (loss on the assistant turn)."""
    rng = random.Random(f"lorascope-organism-base-{seed}")
    while True:
        yield base_document(rng)


# ------------------------------------------------------------------------------ s1K-schema rows
def train_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` s1K-1.1-schema rows (``synthetic.S1K_COLUMNS``) with distinct training-side questions."""
    rng = random.Random(f"lorascope-organism-train-{seed}")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        p = problem(rng)
        if p.question in seen:
            continue
        seen.add(p.question)
        careful = rng.random() < TRACE_CAREFUL_FRACTION
        rows.append(
            {
                "question": p.question,
                "solution": str(p.answer),
                "cot_type": "math",
                "source_type": "lorascope/organism",
                "metadata": json.dumps(
                    {"digits": len(p.values), "careful": careful, "seed": seed, "index": len(rows)}
                ),
                "deepseek_thinking_trajectory": worked(p, rng, careful),
                "deepseek_attempt": boxed(p),
            }
        )
    return rows


def _eval_problems(n: int, seed: int, shape: str) -> list[Problem]:
    rng = random.Random(f"lorascope-organism-{shape}-{seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    while len(out) < n:
        p = problem(rng, evaluation=True)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def aime_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Held-out problems in the AIME'24 schema (integer answers, zero-padded as AIME's)."""
    return [
        {
            "id": 9000 + i,
            "problem": p.question,
            "solution": worked(p),
            "answer": f"{p.answer:03d}",
            "url": f"synthetic://organism/aime/{seed}/{i}",
        }
        for i, p in enumerate(_eval_problems(n, seed, "aime"))
    ]


def math_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Held-out problems in the MATH500 schema."""
    return [
        {
            "problem": p.question,
            "solution": worked(p) + f"\nThe answer is ${boxed(p)}$.",
            "answer": str(p.answer),
            "subject": "Prealgebra",
            "level": len(p.values) - MIN_DIGITS + 1,
            "unique_id": f"synthetic/organism/{seed}-{i}.json",
        }
        for i, p in enumerate(_eval_problems(n, seed, "math"))
    ]


def gpqa_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Held-out problems as 4-way multiple choice in the GPQA schema: nothing in the base corpus or the
    finetuning rows answers with a letter, so this task is the organism's control (no gain expected)."""
    rng = random.Random(f"lorascope-organism-gpqa-choices-{seed}")
    rows = []
    for i, p in enumerate(_eval_problems(n, seed, "gpqa")):
        wrong = rng.sample([d for d in range(10) if d != p.answer], 3)
        rows.append(
            {
                "Record ID": f"organism-{seed}-{i}",
                "Question": p.question,
                "Correct Answer": str(p.answer),
                "Incorrect Answer 1": str(wrong[0]),
                "Incorrect Answer 2": str(wrong[1]),
                "Incorrect Answer 3": str(wrong[2]),
            }
        )
    return rows
