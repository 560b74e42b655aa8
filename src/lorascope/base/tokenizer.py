"""A small byte-level BPE tokenizer in Qwen2.5's image, trained offline on the synthetic corpus.

Same normalizer (NFC), pre-tokenizer split regex, byte-level alphabet, ChatML special tokens and chat
template as the released Qwen2.5 tokenizer; only the vocabulary is small and domain-trained.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2's pre-tokenizer pattern (single digits, letters with one leading non-letter, ...)."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5's ChatML template (default system prompt included), without the tool-calling branches."""


CHAT_SCAFFOLD = "system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\nuser\nassistant\nthink\nanswer\n"
"""The plain text the chat template wraps around every row (special tokens are added separately)."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, whole: Iterable[str] = ()) -> Any:
    """Train the BPE on ``texts`` and wrap it as a transformers fast tokenizer with the chat template;
    each string of ``whole`` becomes one token wherever it occurs (an added, non-special token)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(list(whole))
    fast.chat_template = CHAT_TEMPLATE
    return fast
