"""s1's chat format, which the finetunes learn and every stage that prompts a model writes: the user turn
through the tokenizer's chat template, then ``<|im_start|>think`` (the thinking), then
``<|im_start|>answer`` (the answer); a thinking cut by its budget gets ``Final Answer:`` forced after the
marker. ``evaluate`` decodes with it (``evaluate.forcing``) and so does ``steer``."""

from __future__ import annotations

from typing import Any

THINK = "<|im_start|>think"
"""s1's ``thinking_start``: appended to the chat prompt; the model writes the newline after it."""
ANSWER = "<|im_start|>answer"
"""s1's ``thinking_end``: closes a thinking phase that ended on its own."""
FINAL = "\nFinal Answer:"
"""What s1 appends after ``ANSWER`` when the thinking budget ran out."""


def chat_template(tokenizer: Any, user: str) -> str:
    """The user turn through the tokenizer's chat template (system turn included), opening the
    assistant turn."""
    messages = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_prompt(tokenizer: Any, user: str) -> str:
    """The chat prompt of a think-format model: the assistant turn opens its thinking."""
    return chat_template(tokenizer, user) + THINK


def answer_end(thinking: str, forced: bool) -> str:
    """What s1 appends to the thinking before the answer: ``<|im_start|>answer`` when the model ended
    its thinking, ``<|im_start|>answer\\nFinal Answer:`` (on a new line) when the budget did."""
    if not forced:
        return ANSWER
    return ("" if thinking.endswith("\n") else "\n") + ANSWER + FINAL
