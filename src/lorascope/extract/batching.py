"""Packing documents into padded batches under a token budget (the extract pass and its merge check)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def pack_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group document indices, longest first, so that batch size x longest length <= batch_tokens
    (a document longer than the budget forms a batch alone). Sorting keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def padded_batches(docs: list[list[int]], batch_tokens: int) -> Iterator[tuple[list[int], Any, Any]]:
    """``(document indices, input_ids, attention_mask or None)`` per packed batch: right padding,
    a mask only when the batch holds several documents (one document needs none)."""
    import torch

    lengths = [len(d) for d in docs]
    for batch in pack_batches(lengths, batch_tokens):
        width = lengths[batch[0]]
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : lengths[i]] = torch.as_tensor(docs[i])
            mask[row, : lengths[i]] = 1
        yield batch, input_ids, mask if len(batch) > 1 else None
