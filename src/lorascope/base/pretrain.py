"""Pretrain the tiny base model on the organism's base corpus (``organism.base_documents``).

Plain next-token cross-entropy on the assistant turns of each chat (the system and user turns are
context only: the question's digits are random and teach nothing), AdamW with a linear warmup over the
first 5% of the steps and a cosine decay to zero, gradients clipped at norm 1. The documents, their
order, the initialisation and the updates are all seeded, and the CPU runs it single-threaded, so the
same params give the same weights byte for byte.
"""

from __future__ import annotations

import math
from typing import Any

from lorascope.base.params import TinyPretrain
from lorascope.errors import LorascopeError

WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.01
BETAS = (0.9, 0.95)
MAX_GRAD_NORM = 1.0
LOG_EVERY = 25

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
"""The system prompt the chat template adds when a chat has none."""


def render(chat: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """``chat`` as the tiny tokenizer's chat template (``base.tokenizer.CHAT_TEMPLATE``) renders it, and
    the character span of every assistant turn (its content and closing ``<|im_end|>``): the trained part."""
    system = chat[0]["content"] if chat and chat[0]["role"] == "system" else DEFAULT_SYSTEM
    text = f"<|im_start|>system\n{system}<|im_end|>\n"
    spans = []
    for i, message in enumerate(chat):
        if message["role"] == "system" and i == 0:
            continue
        text += f"<|im_start|>{message['role']}\n"
        start = len(text)
        text += message["content"] + "<|im_end|>"
        if message["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    return text, spans


def batch(tokenizer: Any, chats: list[list[dict[str, str]]], row_tokens: int = 0) -> tuple[Any, Any, Any]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the assistant turns) of ``chats``:
    one right-padded row per chat, or with ``row_tokens`` packed in order into rows of at most that
    many tokens (a chat that does not fit starts the next row; chats in a row attend to earlier ones)."""
    import torch

    rendered = [render(c) for c in chats]
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    docs = []
    for tokens, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered, strict=True):
        trained = [any(a <= lo < b for a, b in spans) for lo, _ in offsets]
        docs.append((tokens, trained))
    rows: list[list[tuple[list[int], list[bool]]]] = []
    for doc in docs:
        if rows and row_tokens and sum(len(t) for t, _ in rows[-1]) + len(doc[0]) <= row_tokens:
            rows[-1].append(doc)
        else:
            rows.append([doc])
    width = max(sum(len(t) for t, _ in row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, row in enumerate(rows):
        tokens = [t for doc, _ in row for t in doc]
        trained = [x for _, flags in row for x in flags]
        n = len(tokens)
        ids[r, :n] = torch.as_tensor(tokens)
        mask[r, :n] = 1
        labels[r, :n] = torch.where(torch.as_tensor(trained), ids[r, :n], -100)
    return ids, mask, labels


def trained_loss(model: Any, ids: Any, mask: Any, labels: Any) -> Any:
    """Next-token cross-entropy over the trained tokens, as ``model(..., labels=labels).loss`` computes it,
    with the LM head applied at those positions only (the logits of the others are never used)."""
    import torch

    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), targets[keep])


def pretrain(model: Any, tokenizer: Any, cfg: TinyPretrain, seed: int) -> dict[str, float]:
    """Train ``model`` in place for ``cfg.steps`` steps; returns summary metrics (final loss, tokens)."""
    import mlflow
    import torch

    from lorascope.organism import base_documents
    from lorascope.progress import track

    torch.manual_seed(seed)
    docs = base_documents(seed)
    first = next(base_documents(seed))
    if render(first)[0] != tokenizer.apply_chat_template(first, tokenize=False):
        raise LorascopeError(
            "base: the tiny tokenizer's chat template renders chats differently than pretraining"
        )
    # fused: its square root is ATen's own, the same on every CPU (the unfused one's is MKL's: lorascope.kernels)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)
    warmup = max(1, round(WARMUP_FRACTION * cfg.steps))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    tokens = 0
    recent: list[float] = []
    for step in track(range(cfg.steps), "base: pretraining", total=cfg.steps):
        ids, mask, labels = batch(tokenizer, [next(docs) for _ in range(cfg.batch_size)])
        loss = trained_loss(model, ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        recent = [*recent[-(LOG_EVERY - 1) :], loss.item()]
        if (step + 1) % LOG_EVERY == 0 or step + 1 == cfg.steps:
            mlflow.log_metric("pretrain.loss", sum(recent) / len(recent), step=step + 1)
    model.eval()
    return {"pretrain.final_loss": sum(recent) / max(len(recent), 1), "pretrain.tokens": float(tokens)}
