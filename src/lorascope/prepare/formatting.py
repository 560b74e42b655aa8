"""s1's training format: chat messages through the tokenizer's chat template, loss on the assistant only.

The assistant turn is ``"<|im_start|>think\\n" + trajectory + "\\n<|im_start|>answer\\n" + answer`` where
the answer gets an ``"Answer: "`` prefix unless it already contains one (s1's ``process_cot_example``).
Labels are -100 up to and including ``<|im_start|>assistant\\n``: the first trained token is the first
token of the assistant content, and the closing ``<|im_end|>\\n`` is trained on (s1's collator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

THINK = "<|im_start|>think\n"
ANSWER = "\n<|im_start|>answer\n"


def assistant_content(trajectory: str | list[str], attempt: str) -> str:
    """The assistant turn exactly as s1 builds it (a list trajectory, as in s1K v1, is joined)."""
    if isinstance(trajectory, (list, tuple)):
        trajectory = "\n".join(trajectory)
    answer = attempt if "Answer:" in attempt else "Answer: " + attempt
    return THINK + trajectory.strip() + ANSWER + answer.strip()


def messages(question: str, trajectory: str | list[str], attempt: str) -> list[dict[str, str]]:
    """The two chat turns of one training row."""
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": assistant_content(trajectory, attempt)},
    ]


@dataclass(frozen=True)
class Encoded:
    """One tokenized training row."""

    text: str
    """The rendered chat text (system turn from the template, user, assistant)."""
    input_ids: list[int]
    """Token ids, truncated to the block size."""
    loss_start: int
    """Index of the first trained token; labels are -100 before it (and equal ids from it on)."""
    n_tokens_full: int
    """Token count before truncation."""

    @property
    def labels(self) -> list[int]:
        """Labels for causal-LM training: -100 on the prompt, the token ids on the assistant turn."""
        return [-100] * self.loss_start + self.input_ids[self.loss_start :]

    @property
    def n_loss_tokens(self) -> int:
        """Trained tokens left after truncation."""
        return max(0, len(self.input_ids) - self.loss_start)


def encode(
    tokenizer: Any, question: str, trajectory: str | list[str], attempt: str, block_size: int
) -> Encoded:
    """Render one row with the chat template, tokenize it and place the loss mask.

    The mask boundary is found from character offsets, not by tokenizing the prompt separately, so
    it is right whatever the tokenizer merges across the boundary.
    """
    msgs = messages(question, trajectory, attempt)
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    if not text.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently alone and with the answer")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    loss_start = next((i for i, (start, _) in enumerate(offsets) if start >= len(prompt)), len(ids))
    return Encoded(text=text, input_ids=ids[:block_size], loss_start=loss_start, n_tokens_full=len(ids))
