"""Greedy generation with an offset added to the adapter state, and what the sweep counts in it.

A forward hook on every ``lora_A`` adds that component's columns of the offset to its output at
every position (prompt and generated tokens), so the module's output moves by ``scaling * B`` times
the offset; an offset of zero leaves every logit as it was.

Generated text is decoded with its special tokens (``<|im_start|>answer`` marks where the answer starts:
dropping it, as ``skip_special_tokens`` would, leaves the grader only its fallbacks); only the closing
``<|im_end|>`` is left out. Backtracking is counted two ways: ``count_words`` (whole words,
case-sensitive) and ``paper_backtrack_pct``, the paper author's ``count_patterns`` (jnward/
reasoning_behavior_probes: each word as a case-insensitive pattern, occurrences per 100
whitespace-separated words, summed over the words).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lorascope.components import Component


@contextmanager
def steered(peft_model: Any, comps: Sequence[Component], offset_C: torch.Tensor) -> Iterator[None]:
    """Add ``offset_C`` (one value per adapter-state column, component order) to every ``x . A``."""
    base = peft_model.get_base_model()
    handles, start = [], 0
    for comp in comps:
        cols = offset_C[start : start + comp.width]
        start += comp.width
        lora_A = base.get_submodule(comp.module).lora_A["default"]

        def add(_m: Any, _args: Any, out: torch.Tensor, cols: torch.Tensor = cols) -> torch.Tensor:
            return out + cols.to(out.device, out.dtype)

        handles.append(lora_A.register_forward_hook(add))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Generation:
    """One prompt's continuation."""

    text: str
    tokens: int
    """Generated tokens, up to and including the end-of-turn token."""
    finished: bool
    """Whether it ended with the end-of-turn token within the budget."""


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int
) -> list[Generation]:
    """Greedy continuations of ``prompts`` (left-padded batches) up to ``<|im_end|>``."""
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop
    device = next(model.parameters()).device
    out: list[Generation] = []
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
            eos_token_id=stop,
            pad_token_id=pad,
        )
        for row in result[:, width:].tolist():
            n = row.index(stop) + 1 if stop in row else len(row)
            finished = stop in row[:n]
            # keep <|im_start|>answer (special): only the closing <|im_end|> is not part of the text
            text = tokenizer.decode(row[: n - 1] if finished else row[:n], skip_special_tokens=False)
            out.append(Generation(text, n, finished))
    return out


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
