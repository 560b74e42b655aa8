"""An offline, deterministic stand-in for the labelling LLM: a clearly labelled NON-LLM baseline.

It answers each of the four prompts in the format that prompt asks for, from counts over the prompt's own
contents, so the labelling stages run end to end without an API key and give a floor that an LLM labeller
should beat. Its explanations start with ``[heuristic]`` and its model is ``heuristic-baseline``, so its
labels are never mistaken for an LLM's.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from collections.abc import Callable
from functools import cache
from typing import Any

from lorascope.labelling.prompts import PLACEHOLDERS, TemplateName, template
from lorascope.llm.completion import Completion, LlmError

MODEL = "heuristic-baseline"
VERSION = 3
"""Part of the cache key: bump when the rules change, so cached answers of the old rules miss (2: the word
before the top token, when the examples agree on it; 3: else the first word of its line)."""
CONTEXT_SHARE = 0.6
"""The share of the top token's occurrences that must follow one word for the explanation to name it."""
_WORD_BEFORE = re.compile(r"([A-Za-z]+) ?$")
_LINE_START = re.compile(r"^([A-Za-z]+)\b")

CLASSES: dict[str, tuple[str, str]] = {
    "digits": (
        "Digits",
        "Features whose main token is a number, as in arithmetic, counting and enumeration.",
    ),
    "punctuation": (
        "Punctuation",
        "Features whose main token is punctuation or a symbol, marking the structure of sentences and formulas.",
    ),
    "whitespace_or_newline": (
        "Whitespace or newline",
        "Features whose main token is whitespace or a line break, marking layout boundaries.",
    ),
    "special_marker": (
        "Special marker",
        "Features whose main token is a special marker such as <|im_start|> or <think>, marking chat and "
        "reasoning structure.",
    ),
    "reasoning_word": (
        "Reasoning word",
        "Features whose main token is a discourse word of step-by-step reasoning, such as wait, but or "
        "therefore.",
    ),
    "other_word": ("Other word", "Features whose main token is any other word or word piece."),
}
"""The categories, by the character class of a feature's main token, in the order they are listed."""

REASONING_WORDS = frozenset(
    [
        "wait",
        "but",
        "hmm",
        "so",
        "therefore",
        "thus",
        "hence",
        "alternatively",
        "let",
        "check",
        "verify",
        "actually",
        "however",
        "maybe",
        "perhaps",
        "okay",
        "ok",
        "now",
        "then",
        "first",
        "next",
        "recall",
        "suppose",
        "consider",
        "again",
        "instead",
    ]
)
_SPECIAL = re.compile(r"<\|?/?[\w.:-]+\|?>")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_MAX_EXAMPLES = 5  # per category: the B.2a prompt asks for 3-5


def token_class(token: str) -> str:
    """The category id of one token: whitespace, marker, number, punctuation, reasoning word or other."""
    text = token.strip()
    if not text:
        return "whitespace_or_newline"
    if _SPECIAL.fullmatch(text):
        return "special_marker"
    if _NUMBER.fullmatch(text):
        return "digits"
    if not any(c.isalnum() for c in text):
        return "punctuation"
    return "reasoning_word" if text.lower() in REASONING_WORDS else "other_word"


def quoted_tokens(explanation: str) -> list[str]:
    """The quoted tokens of an explanation, unescaped (the heuristic quotes them with ``repr``)."""
    tokens = []
    for quoted in _QUOTED.findall(explanation):
        value = _literal(quoted)
        tokens.append(quoted[1:-1] if value is None else value)
    return tokens


def explanation_class(explanation: str) -> str:
    """The category id of an explanation: that of its first quoted token (``other_word`` if none)."""
    tokens = quoted_tokens(explanation)
    return token_class(tokens[0]) if tokens else "other_word"


class HeuristicClient:
    """A ``Client`` answering from the rules in this module, with zero token usage."""

    model = MODEL
    backend = "heuristic"

    def key_inputs(
        self, prompt: str, *, max_tokens: int, temperature: float | None, schema: Any = None
    ) -> dict[str, Any]:
        """The prompt and the rules' version: sampling parameters (and a reply schema: the rules
        answer each prompt in its format anyway) do not change a rule's answer."""
        return {"backend": "heuristic", "model": MODEL, "version": VERSION, "prompt": prompt}

    async def complete(
        self, prompt: str, *, max_tokens: int, temperature: float | None, schema: Any = None
    ) -> Completion:
        return Completion(text=_answer(prompt), input_tokens=0, output_tokens=0, model=MODEL)


def _answer(prompt: str) -> str:
    """Recognise the template by its first line (no template has a placeholder there), read the filled-in
    values back out, and answer in the format that template asks for."""
    name = _first_lines().get(prompt.partition("\n")[0])
    match = _pattern(name).fullmatch(prompt) if name else None
    if name is None or match is None:
        raise LlmError(f"{MODEL}: the prompt follows none of the {', '.join(PLACEHOLDERS)} templates")
    values = dict(zip(_placeholder_order(name), match.groups(), strict=True))
    if name == "explain":
        return json.dumps(_explain(values["{activations_str}"]), indent=1, ensure_ascii=False)
    if name == "categories":
        return json.dumps(_categories(values["{feature_list}"]), indent=1, ensure_ascii=False)
    if name == "categorize":
        return _categorize(values["{feature.explanation}"], values["{categories_str}"])
    return json.dumps({"matches": _detect(values["{explanation}"], values["{snippets}"])})


def _explain(activations: str) -> dict[str, Any]:
    """Top tokens by summed activation, and the word before the top one where the examples agree on it
    (``fires on ',' after 'Wait'``: what a reader of the contexts would say); the classification from how
    concentrated the mass is."""
    mass: dict[str, float] = {}
    texts = []
    for block in activations.split("\n\n"):
        texts.append(block.split("\n")[0])
        for line in block.split("\n")[1:]:  # the first line of each example is its text
            token, _, value = line.rpartition(" ")
            try:
                mass[token] = mass.get(token, 0.0) + float(value)
            except ValueError:
                raise LlmError(f"{MODEL}: cannot read the activation line {line!r}") from None
    total = sum(mass.values())
    if not total > 0:
        return {
            "explanation": "[heuristic] no token fired in these examples",
            "classification": 2,
            "classification_reasoning": "[heuristic] no activating tokens to go by",
        }
    ranked = sorted(mass, key=lambda t: -mass[t])  # stable: ties keep first appearance
    shares = [mass[t] / total for t in ranked]
    k = next((k for k in (1, 2) if sum(shares[:k]) >= 0.6), 3)
    top1, top3 = shares[0], sum(shares[:3])
    context = ""
    if before := _agreed(ranked[0], texts, _before):
        context = f" after {before!r}"
    elif start := _agreed(ranked[0], texts, _line_start):
        context = f" in lines starting with {start!r}"
    return {
        "explanation": "[heuristic] fires on " + ", ".join(repr(_token_of(t)) for t in ranked[:k]) + context,
        "classification": 0 if top1 >= 0.6 else 1 if top3 >= 0.6 else 2,
        "classification_reasoning": (
            f"[heuristic] the top token holds {top1:.0%} and the top three {top3:.0%} of the activation "
            f"mass over {len(ranked)} distinct tokens (class 0 needs the top token at 60%, class 1 the top three)"
        ),
    }


def _before(text: str, at: int) -> str | None:
    """The word right before position ``at`` (None after a line break, a digit or a symbol)."""
    m = _WORD_BEFORE.search(text[:at])
    return m[1] if m else None


def _line_start(text: str, at: int) -> str | None:
    """The first word of the line holding position ``at``."""
    m = _LINE_START.match(text[text.rfind("\n", 0, at) + 1 :])
    return m[1] if m else None


def _agreed(token: str, texts: list[str], context: Callable[[str, int], str | None]) -> str | None:
    """The word ``context`` finds around ``token`` in at least ``CONTEXT_SHARE`` of its occurrences in the
    example texts (at least two occurrences; none for a whitespace token, nor the token itself)."""
    if not token.strip() or _token_of(token) != token:
        return None
    words: dict[str | None, int] = {}
    for shown in texts:
        text = shown.replace("\\n", "\n")  # the prompt shows newlines as \n: a word starts after one
        at = text.find(token)
        while at >= 0:
            word = context(text, at)
            words[word] = words.get(word, 0) + 1
            at = text.find(token, at + len(token))
    total = sum(words.values())
    best = max(words, key=lambda w: words[w], default=None)
    if best is None or best == token or total < 2 or words[best] < CONTEXT_SHARE * total:
        return None
    return best


def _categories(feature_list: str) -> dict[str, Any]:
    """All six character-class categories (the prompt asks for 5-8), each with its first few members."""
    members: dict[str, list[str]] = {string_id: [] for string_id in CLASSES}
    for line in feature_list.split("\n"):
        if line.startswith("- "):
            explanation = line.removeprefix("- ")
            members[explanation_class(explanation)].append(explanation)
    counts = ", ".join(f"{string_id} {len(found)}" for string_id, found in members.items())
    return {
        "categories": [
            {
                "string_id": string_id,
                "name": name,
                "definition": definition,
                "examples": members[string_id][:_MAX_EXAMPLES],
            }
            for string_id, (name, definition) in CLASSES.items()
        ],
        "summary": f"[heuristic] grouped by the character class of each explanation's first quoted token: {counts}",
    }


def _categorize(explanation: str, categories: str) -> str:
    """The explanation's class if it is listed, else the first listed category."""
    listed = [line.partition(":")[0].strip() for line in categories.split("\n") if line.strip()]
    if not listed:
        raise LlmError(f"{MODEL}: the categorize prompt lists no categories")
    wanted = explanation_class(explanation)
    return wanted if wanted in listed else listed[0]


def _detect(explanation: str, snippets: str) -> list[int]:
    """The snippets that contain any quoted token of the explanation (newlines escaped as in the prompt)."""
    tokens = [token.replace("\n", "\\n") for token in quoted_tokens(explanation) if token]
    numbered = (line.partition(". ") for line in snippets.split("\n"))
    return [int(number) for number, _, text in numbered if any(token in text for token in tokens)]


def _token_of(shown: str) -> str:
    """The token behind its shown form: a whitespace-only token is shown as its ``repr``."""
    value = _literal(shown)
    return value if value is not None and not value.strip() else shown


def _literal(quoted: str) -> str | None:
    """A quoted Python string literal's value; None if ``quoted`` is not one."""
    if len(quoted) < 2 or quoted[0] != quoted[-1] or quoted[0] not in "'\"":
        return None
    try:
        with warnings.catch_warnings():  # an invalid escape in a model's text warns, then reads literally
            warnings.simplefilter("ignore")
            value = ast.literal_eval(quoted)
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, str) else None


@cache
def _first_lines() -> dict[str, TemplateName]:
    return {template(name).partition("\n")[0]: name for name in PLACEHOLDERS}


def _placeholder_order(name: TemplateName) -> list[str]:
    return re.findall(_placeholder_alternation(name), template(name))


@cache
def _pattern(name: TemplateName) -> re.Pattern[str]:
    """The template as a regex with one lazy group per placeholder, in order of appearance."""
    pieces = re.split(_placeholder_alternation(name), template(name))
    return re.compile("(.*?)".join(re.escape(piece) for piece in pieces), re.DOTALL)


def _placeholder_alternation(name: TemplateName) -> str:
    return "|".join(re.escape(placeholder) for placeholder in PLACEHOLDERS[name])
