"""The labelling prompts against the paper's listing, the activation format, the reply parsers, and the
offline heuristic labeller driven through the ``Client`` interface."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from lorascope.labelling.heuristic import CLASSES, HeuristicClient
from lorascope.labelling.prompts import (
    PLACEHOLDERS,
    Category,
    Example,
    ParseError,
    activations_str,
    categorize_prompt,
    category_generation_prompt,
    detection_prompt,
    examples_str,
    explain_prompt,
    parse_categories,
    parse_category_id,
    parse_detection,
    parse_label,
    prompt_hash,
    template,
)
from lorascope.llm.cache import DiskCache
from lorascope.llm.clients import CachedClient, Client, LlmError, run_all

from tests.conftest import SHARED_DATA

PAPER_PROMPTS = SHARED_DATA / "paper_prompts.md"  # ../shared beside the checkout, wherever it is
SECTIONS = {"## B.1 ": "explain", "## B.2a ": "categories", "## B.2b ": "categorize"}

# The paper's own illustration of the format (B.1): max_act 10 makes the values the raw activations.
TREE = Example(
    tokens=["cat", " and", " mouse", " ran", " around", " the", " tree", ".", " They", " quickly"],
    acts=[0.0, 0.0, 0.0, 2.3, 1.01, 0.0, 7.81, 0.0, 0.0, 0.0],
)
TREE_STR = "cat and mouse ran around the tree. They quickly\ntree 7.81\nran 2.30\naround 1.01"
CATEGORIES = [
    Category("nouns", "Nouns", "Concrete nouns.", ["tree tokens"]),
    Category("reasoning_word", "Reasoning", "Words like wait.", []),
]
CATEGORIES_STR = "nouns: Nouns - Concrete nouns.\nreasoning_word: Reasoning - Words like wait."


@pytest.fixture(scope="module")
def paper() -> dict[str, str]:
    """The three ~~~text blocks of the listing, by the section they sit under, each line newline-ended."""
    if not PAPER_PROMPTS.exists():
        pytest.skip(f"{PAPER_PROMPTS} (the paper's prompt listing) is absent")
    blocks: dict[str, str] = {}
    section, lines = None, None
    for line in PAPER_PROMPTS.read_text(encoding="utf-8").splitlines():
        if lines is not None:
            if line == "~~~":
                blocks[section] = "".join(f"{kept}\n" for kept in lines)
                lines = None
            else:
                lines.append(line)
        elif line == "~~~text":
            lines = []
        elif line.startswith("## "):
            section = next((name for head, name in SECTIONS.items() if line.startswith(head)), None)
    assert sorted(blocks) == sorted(SECTIONS.values())
    return blocks


def ask(client: Client, prompt: str) -> str:
    return asyncio.run(client.complete(prompt, max_tokens=256, temperature=0.0)).text


def feature(token_acts: list[tuple[str, float]], copies: int = 3) -> list[Example]:
    """A few windows of one feature: a fixed lead-in, then the given tokens with their activations."""
    pairs = [("The", 0.0), (" answer", 0.0), (" is", 0.0), *token_acts]
    return [Example([token for token, _ in pairs], [act for _, act in pairs]) for _ in range(copies)]


# --------------------------------------------------------------------------------------- templates
def test_paper_templates_word_for_word(paper: dict[str, str]) -> None:
    for name, text in paper.items():
        assert template(name) == text
    assert explain_prompt([TREE], 10.0) == paper["explain"].replace("{activations_str}", TREE_STR)
    explanations = ["tree tokens", "the word 'wait' {in braces}"]
    assert category_generation_prompt(explanations) == paper["categories"].replace(
        "{feature_list}", "- tree tokens\n- the word 'wait' {in braces}"
    )
    expected = (
        paper["categorize"]
        .replace("{feature.explanation}", "tree tokens")
        .replace("{examples_str}", TREE_STR)
        .replace("{categories_str}", CATEGORIES_STR)
    )
    assert categorize_prompt("tree tokens", [TREE], 10.0, CATEGORIES) == expected


def test_every_placeholder_once_and_hashes() -> None:
    for name, placeholders in PLACEHOLDERS.items():
        for placeholder in placeholders:
            assert template(name).count(placeholder) == 1, (name, placeholder)
        assert prompt_hash(name) == hashlib.sha256(template(name).encode()).hexdigest()
    assert len({prompt_hash(name) for name in PLACEHOLDERS}) == 4
    with pytest.raises(ValueError, match="unknown prompt template 'explian'"):
        template("explian")  # type: ignore[arg-type]


def test_values_are_never_substituted_into() -> None:
    prompt = categorize_prompt("odd {examples_str} {categories_str}", [TREE], 10.0, CATEGORIES)
    assert 'Feature explanation: "odd {examples_str} {categories_str}"' in prompt
    assert prompt.count(TREE_STR) == 1 and prompt.count(CATEGORIES_STR) == 1


def test_detection_prompt() -> None:
    prompt = detection_prompt("the word 'tree'", ["a tree", "two\nlines", ""])
    assert "\"the word 'tree'\"" in prompt
    assert "<snippets>\n1. a tree\n2. two\\nlines\n3. \n</snippets>" in prompt
    assert prompt.endswith('{"matches": [<snippet numbers>]}\n')


# ------------------------------------------------------------------------------- activation format
def test_scaling_sort_and_omission() -> None:
    example = Example(["A", " b", " c", " d", " e", " f"], [1.0, 4.0, -2.0, 5.0, 0.001, 1.0])
    # 1/4*10 = 2.50; 4 -> 10.00; negative left out; 5 clipped to 10.00; 0.0025 rounds to 0.00, left out;
    # equal values in position order.
    assert activations_str([example], 4.0) == "A b c d e f\nb 10.00\nd 10.00\nA 2.50\nf 2.50"


def test_newlines_whitespace_tokens_and_several_examples() -> None:
    first = Example(["x", "\n", "y\n", "  "], [1.0, 2.0, 3.0, 0.5])
    quiet = Example(["z"], [0.0])
    lines = ["x\\ny\\n  ", "y 10.00", "'\\n' 6.67", "x 3.33", "'  ' 1.67"]
    assert activations_str([first, quiet], 3.0) == "\n".join(lines) + "\n\nz"


def test_examples_str_keeps_the_first_n() -> None:
    examples = [Example([f"t{i}"], [1.0]) for i in range(7)]
    assert examples_str(examples, 1.0) == "\n\n".join(f"t{i}\nt{i} 10.00" for i in range(5))
    assert examples_str(examples, 1.0, n=2) == "t0\nt0 10.00\n\nt1\nt1 10.00"


@pytest.mark.parametrize("max_act", [0.0, -1.0, float("nan")])
def test_max_act_must_be_positive(max_act: float) -> None:
    with pytest.raises(ValueError, match="max_act must be positive"):
        activations_str([TREE], max_act)


def test_example_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="2 tokens but 1 activations"):
        Example(["a", "b"], [1.0])


# ----------------------------------------------------------------------------------------- parsers
def test_parse_label() -> None:
    label = parse_label('{"explanation": " tree ", "classification": 0, "classification_reasoning": "r"}')
    assert (label.explanation, label.classification, label.reasoning) == ("tree", 0, "r")
    fenced = (
        'Sure:\n```json\n{"explanation": "x", "classification": "1", "classification_reasoning": ""}\n```'
    )
    assert parse_label(fenced).classification == 1
    single = "{'explanation': 'x', 'classification': 2, 'classification_reasoning': 'noisy'}"
    assert parse_label(single).classification == 2


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            '{"explanation": "x", "classification": 3, "classification_reasoning": "r"}',
            "must be 0, 1 or 2, got 3",
        ),
        ('{"explanation": "x", "classification": true, "classification_reasoning": "r"}', "got True"),
        ('{"explanation": "x", "classification": "one", "classification_reasoning": "r"}', "got 'one'"),
        ('{"explanation": "x", "classification": 1}', "missing key 'classification_reasoning'"),
        (
            '{"explanation": " ", "classification": 1, "classification_reasoning": "r"}',
            "'explanation' is empty",
        ),
        (
            '{"explanation": 5, "classification": 1, "classification_reasoning": "r"}',
            "must be a string, got int",
        ),
        ("The feature fires on trees.", "no usable JSON: no JSON object or array found"),
        ('["x", 1]', "expected a JSON object"),
    ],
)
def test_parse_label_rejects(reply: str, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_label(reply)


def categories_reply(ids: list[str], **overrides: object) -> str:
    items = [{"string_id": i, "name": i.title(), "definition": f"about {i}", "examples": ["e"]} for i in ids]
    items[0].update(overrides)
    return "Here they are:\n" + json.dumps({"categories": items, "summary": "s"})


def test_parse_categories() -> None:
    ids = ["alpha", "beta_two", "gamma3", "delta", "epsilon"]
    categories = parse_categories(categories_reply(ids), 5, 8)
    assert [c.string_id for c in categories] == ids
    assert categories[1] == Category("beta_two", "Beta_Two", "about beta_two", ["e"])


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (categories_reply(["a", "b", "c", "d"]), "4 categories, expected 5 to 8"),
        (categories_reply(list("abcdefghi")), "9 categories, expected 5 to 8"),
        (categories_reply(["a", "b", "a", "c", "b"]), "duplicate string_id: a, b"),
        (
            categories_reply(["Big Id", "b", "c", "d", "e"]),
            "category 1: string_id 'Big Id' is not snake_case",
        ),
        (categories_reply(list("abcde"), examples="e"), "category 1: 'examples' must be a list of strings"),
        (categories_reply(list("abcde"), definition=None), "category 1: 'definition' must be a string"),
        ('{"summary": "s"}', "missing key 'categories'"),
    ],
)
def test_parse_categories_rejects(reply: str, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_categories(reply, 5, 8)


@pytest.mark.parametrize(
    "reply",
    [
        "reasoning_word",
        ' "reasoning_word"\n',
        "`reasoning_word`.",
        "string_id: reasoning_word",
        "Category: 'reasoning_word'.",
        "**Reasoning_Word**",
        "```\nreasoning_word\n```",
        "```text\nreasoning_word\n```",
    ],
)
def test_parse_category_id(reply: str) -> None:
    assert parse_category_id(reply, ["nouns", "reasoning_word"]) == "reasoning_word"


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ('"planning".', r"""reply '"planning".' is not one of the categories \(nouns, reasoning_word\)"""),
        ("I think reasoning_word fits best", "reply 'I think reasoning_word fits best' is not one"),
    ],
)
def test_parse_category_id_rejects(reply: str, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_category_id(reply, ["nouns", "reasoning_word"])


def test_parse_detection() -> None:
    assert parse_detection('{"matches": [3, 1]}', 3) == [True, False, True]
    assert parse_detection('```json\n{"matches": ["2", 2]}\n```', 3) == [False, True, False]
    assert parse_detection('{"matches": []}', 2) == [False, False]


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ('{"matches": [1, 4]}', "snippet 4 is out of range 1 to 3"),
        ('{"matches": [0]}', "snippet 0 is out of range 1 to 3"),
        ('{"matches": [1.5]}', "'matches' holds 1.5, not a snippet number"),
        ('{"matches": 2}', "'matches' must be a list"),
        ('{"match": [2]}', "missing key 'matches'"),
    ],
)
def test_parse_detection_rejects(reply: str, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_detection(reply, 3)


# --------------------------------------------------------------------------------------- heuristic
def test_heuristic_one_token_feature_is_monosemantic() -> None:
    examples = feature([(" Wait", 8.0), (",", 0.3)]) + feature([(" so", 0.2), (" wait", 6.0)])
    label = parse_label(ask(HeuristicClient(), explain_prompt(examples, 8.0)))
    assert label.explanation == "[heuristic] fires on 'Wait', 'wait' after 'is'"  # every window: "...is Wait"
    assert label.classification == 1  # two spellings: the top token alone holds under 60 %
    label = parse_label(ask(HeuristicClient(), explain_prompt(feature([(" Wait", 8.0), (",", 0.3)]), 8.0)))
    assert label.explanation == "[heuristic] fires on 'Wait' after 'is'" and label.classification == 0
    assert "top token holds 96%" in label.reasoning


def test_heuristic_names_the_word_before_the_top_token_where_the_examples_agree() -> None:
    """The comma of "Wait," is what a reader of its contexts calls the backtracking feature: the word before
    the top token is named when at least 60% of its occurrences follow it, never after a line start."""
    wait = [Example(["5", "=", "6", "\n", "Wait", ",", " 5", "+", "1"], [0, 0, 0, 0, 0.2, 9.0, 0, 0, 0])] * 3
    other = [Example(["Qwen", ",", " created"], [0, 5.0, 0])]
    label = parse_label(ask(HeuristicClient(), explain_prompt([*wait, *other], 9.0)))
    assert label.explanation == "[heuristic] fires on ',' after 'Wait'"  # 3 of its 4 occurrences
    label = parse_label(ask(HeuristicClient(), explain_prompt([*wait[:1], *other], 9.0)))
    assert label.explanation == "[heuristic] fires on ','"  # 1 of 2: no agreement
    lines = [Example(["1", "\n", "b", "8"], [0, 0, 7.0, 0])] * 3  # after a line break: no word
    assert (
        parse_label(ask(HeuristicClient(), explain_prompt(lines, 7.0))).explanation
        == "[heuristic] fires on 'b'"
    )
    # no word right before it: the first word of its line, where the examples agree on it
    check = [Example(["=", "6", "\n", "Wait", ",", " ", "7", "+", "1"], [0, 0, 0, 0, 0, 0, 8.0, 0, 0])] * 2
    plain = [Example(["b", "7", ":", " ", "3"], [0, 5.0, 0, 0, 0])]
    label = parse_label(ask(HeuristicClient(), explain_prompt([*check, *plain], 8.0)))
    assert label.explanation == "[heuristic] fires on '7' in lines starting with 'Wait'"  # 2 of 3
    label = parse_label(ask(HeuristicClient(), explain_prompt([*check[:1], *plain], 8.0)))
    assert label.explanation == "[heuristic] fires on '7'"  # 1 of 2


def test_heuristic_spread_feature_is_polysemantic() -> None:
    spread = feature([(f" w{i}", 1.0) for i in range(12)])
    label = parse_label(ask(HeuristicClient(), explain_prompt(spread, 1.0)))
    assert (
        label.classification == 2 and label.explanation == "[heuristic] fires on 'w0', 'w1', 'w2' after 'is'"
    )


def test_heuristic_whitespace_token_round_trips() -> None:
    label = parse_label(ask(HeuristicClient(), explain_prompt(feature([("\n\n", 5.0)]), 5.0)))
    assert label.explanation == "[heuristic] fires on '\\n\\n'" and label.classification == 0


def test_heuristic_is_deterministic() -> None:
    prompt = explain_prompt(feature([(" 12", 3.0), (" apples", 2.0), (".", 1.0)]), 3.0)
    assert ask(HeuristicClient(), prompt) == ask(HeuristicClient(), prompt)


def test_heuristic_categories_and_categorize() -> None:
    client = HeuristicClient()
    features = {
        "reasoning_word": feature([(" wait", 4.0)]),
        "digits": feature([(" 42", 4.0)]),
        "special_marker": feature([("<|im_start|>", 4.0)]),
        "whitespace_or_newline": feature([("\n", 4.0)]),
        "punctuation": feature([("?", 4.0)]),
        "other_word": feature([(" apple", 4.0)]),
    }
    explanations = {
        kind: parse_label(ask(client, explain_prompt(ex, 4.0))).explanation for kind, ex in features.items()
    }
    reply = ask(client, category_generation_prompt([*explanations.values(), "a model's own label"]))
    categories = parse_categories(reply, 5, 8)
    assert [c.string_id for c in categories] == list(CLASSES)
    by_id = {c.string_id: c for c in categories}
    assert by_id["other_word"].examples == [explanations["other_word"], "a model's own label"]
    for kind, explanation in explanations.items():
        assert by_id[kind].examples[0] == explanation
        answer = ask(client, categorize_prompt(explanation, features[kind], 4.0, categories))
        assert parse_category_id(answer, list(by_id)) == kind
    unlisted = ask(client, categorize_prompt(explanations["digits"], features["digits"], 4.0, CATEGORIES))
    assert unlisted == "nouns"  # its class is not offered: the first listed


def test_heuristic_detection() -> None:
    client = HeuristicClient()
    snippets = ["Wait, no.", "so wait here", "nothing", "x\nwait", "two\nlines"]
    reply = ask(client, detection_prompt("[heuristic] fires on 'wait', '\\n'", snippets))
    assert parse_detection(reply, len(snippets)) == [False, True, False, True, True]
    assert parse_detection(ask(client, detection_prompt("no quotes here", snippets)), 5) == [False] * 5


@pytest.mark.parametrize(
    "prompt",
    ["What is 2 + 2?", template("explain").partition("<neuron_activations>")[0]],
    ids=["unknown", "truncated"],
)
def test_heuristic_rejects_other_prompts(prompt: str) -> None:
    with pytest.raises(LlmError, match="heuristic-baseline: the prompt follows none of the"):
        ask(HeuristicClient(), prompt)


def test_heuristic_behind_the_cache_and_run_all(tmp_path: Path) -> None:
    client = CachedClient(HeuristicClient(), DiskCache(tmp_path))
    prompt = explain_prompt([TREE], 10.0)
    first, second = ask(client, prompt), asyncio.run(client.complete(prompt, max_tokens=9, temperature=None))
    assert first == second.text and second.cached
    assert (client.requests, client.hits, client.input_tokens, client.output_tokens) == (1, 1, 0, 0)

    async def one(p: str) -> str:
        return (await client.complete(p, max_tokens=256, temperature=0.0)).text

    results = asyncio.run(run_all([prompt, "not a template"], one, 2, "heuristic"))
    assert results[0] == first and isinstance(results[1], LlmError)
