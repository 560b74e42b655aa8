"""Greedy s1 generation (``steer`` and ``attribute`` generate with it), and the backtracking counts.

Generation follows s1's two phases as ``evaluate`` does (thinking, then the forced answer marker and the
answer; a model left to one free run writes whatever follows ``<|im_start|>`` itself, and the grader, which
looks for ``<|im_start|>answer``, then finds nothing). Generated text keeps its special tokens (dropping the
answer marker, as ``skip_special_tokens`` would, leaves the grader only its fallbacks); only the closing
``<|im_end|>`` is left out. Backtracking is counted two ways: ``count_words`` (whole words,
case-sensitive) and ``paper_backtrack_pct``, the paper author's ``count_patterns`` (jnward/
reasoning_behavior_probes: each word as a case-insensitive pattern, occurrences per 100
whitespace-separated words, summed over the words).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorascope.chat import answer_end


@dataclass
class Generation:
    """One prompt's continuation: its thinking, the answer marker and the answer."""

    text: str
    tokens: int
    """Generated tokens of both phases, each phase's closing token included when it was generated."""
    finished: bool
    """Whether the answer ended with the end-of-turn token within its budget."""


@torch.no_grad()
def _greedy(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, stops: list[int], batch_size: int
) -> list[tuple[list[int], bool]]:
    """Greedy continuations of ``prompts`` (left-padded batches), each cut before its first token of
    ``stops``, and whether it stopped there (False: the budget ran out)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    device = next(model.parameters()).device
    out: list[tuple[list[int], bool]] = []
    for lo in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[lo : lo + batch_size]]
        width = max(map(len, encoded))
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(encoded):
            ids[row, width - len(e) :] = torch.as_tensor(e)
            mask[row, width - len(e) :] = 1
        result = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad,
        )
        for row in result[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            out.append((row, False) if end is None else (row[:end], True))
    return out


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    answer_tokens: int,
) -> list[Generation]:
    """s1's think/answer decoding (``evaluate.forcing``), greedy: each prompt (ending in
    ``<|im_start|>think``) thinks up to its next ``<|im_start|>`` or ``<|im_end|>`` or ``max_new_tokens``,
    then gets ``answer_end`` (the forced ``Final Answer:`` when the budget cut it) and answers up to
    ``<|im_end|>`` in ``answer_tokens``. Whatever the steering does to the thinking, the answer is where
    the grader looks for it."""
    start, stop = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    thoughts = _greedy(model, tokenizer, prompts, max_new_tokens, [start, stop], batch_size)
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids, _ in thoughts]
    heads = [t + answer_end(t, forced=not ended) for t, (_, ended) in zip(texts, thoughts, strict=True)]
    answers = _greedy(
        model,
        tokenizer,
        [p + h for p, h in zip(prompts, heads, strict=True)],
        answer_tokens,
        [stop],
        batch_size,
    )
    return [
        Generation(
            head + tokenizer.decode(ids, skip_special_tokens=False),
            len(thought) + ended + len(ids) + finished,
            finished,
        )
        for head, (thought, ended), (ids, finished) in zip(heads, thoughts, answers, strict=True)
    ]


def paper_backtrack_pct(text: str, words: Sequence[str]) -> float:
    """The paper author's backtracking count (``count_patterns`` in jnward/reasoning_behavior_probes):
    ``100 * occurrences / whitespace-separated words``, each word matched case-insensitively anywhere
    (``Waiting`` counts for ``Wait``), summed over ``words``; 0 for a text without words."""
    total = len(text.split())
    if total == 0:
        return 0.0
    return sum(100 * len(re.findall(re.escape(w), text, re.IGNORECASE)) / total for w in words)


def count_words(text: str, words: Sequence[str]) -> int:
    """Whole-word, case-sensitive occurrences of ``words`` in ``text``."""
    pattern = r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)"
    return len(re.findall(pattern, text))
