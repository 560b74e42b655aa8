"""s1 formatting: the rendered text and the loss mask, on the tiny pipeline's tokenizer (always) and on
the real Qwen2.5 tokenizer (when ../shared has it)."""

from __future__ import annotations

import pytest

from lorascope.prepare.formatting import assistant_content, encode

from tests.conftest import QWEN_TOKENIZER, Prepared

SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
)


@pytest.fixture(params=["tiny", "qwen"])
def qwen(request: pytest.FixtureRequest):
    """A tokenizer with Qwen2.5's chat template and special tokens: the tiny base stage's, or the real one."""
    from transformers import AutoTokenizer

    if request.param == "qwen":
        if not (QWEN_TOKENIZER / "tokenizer.json").is_file():
            pytest.skip(f"real Qwen2.5 tokenizer not found at {QWEN_TOKENIZER}")
        return AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))
    prepared: Prepared = request.getfixturevalue("prepared")
    return AutoTokenizer.from_pretrained(str(prepared.root / "models/base"))


def test_text_matches_s1_format_byte_for_byte(qwen):
    q, traj, attempt = (
        "What is $3 \\times 4$?",
        "  3 times 4 is 12.\nWait, let me check: yes.\n",
        "$\\boxed{12}$ \n",
    )
    expected = (
        SYSTEM
        + "<|im_start|>user\nWhat is $3 \\times 4$?<|im_end|>\n"
        + "<|im_start|>assistant\n"
        + "<|im_start|>think\n3 times 4 is 12.\nWait, let me check: yes.\n<|im_start|>answer\nAnswer: $\\boxed{12}$"
        + "<|im_end|>\n"
    )
    assert encode(qwen, q, traj, attempt, 10_000).text == expected


def test_existing_answer_marker_is_not_doubled():
    assert assistant_content("t", "Answer: 5").endswith("<|im_start|>answer\nAnswer: 5")
    assert (
        assistant_content(["step 1", "step 2"], "5")
        == "<|im_start|>think\nstep 1\nstep 2\n<|im_start|>answer\nAnswer: 5"
    )


def test_first_trained_token_is_the_first_assistant_token(qwen):
    enc = encode(qwen, "Compute 2+2.", "2+2 is 4.", "\\boxed{4}", 10_000)
    ids = enc.input_ids
    im_start, im_end = qwen.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    if qwen.name_or_path == str(QWEN_TOKENIZER):
        assert (im_start, im_end) == (151644, 151645)
    assert qwen.convert_ids_to_tokens(ids[enc.loss_start - 3 : enc.loss_start]) == [
        "<|im_start|>",
        "assistant",
        "Ċ",
    ]
    assert ids[enc.loss_start] == im_start  # the "<|im_start|>" that opens "think"
    assert qwen.decode(ids[enc.loss_start :]).startswith("<|im_start|>think\n2+2 is 4.")
    labels = enc.labels
    assert labels[: enc.loss_start] == [-100] * enc.loss_start
    assert labels[enc.loss_start :] == ids[enc.loss_start :]
    assert ids[-2:] == [im_end, qwen.convert_tokens_to_ids("Ċ")]  # the closing <|im_end|>\n is trained on
    # the prompt alone tokenizes to exactly the masked tokens
    prompt = qwen.apply_chat_template(
        [{"role": "user", "content": "Compute 2+2."}], tokenize=False, add_generation_prompt=True
    )
    assert qwen(prompt, add_special_tokens=False)["input_ids"] == ids[: enc.loss_start]


def test_truncation_is_counted(qwen):
    full = encode(qwen, "Q?", "word " * 300, "1", 100_000)
    cut = encode(qwen, "Q?", "word " * 300, "1", 64)
    assert cut.n_tokens_full == full.n_tokens_full == len(full.input_ids) > 64
    assert cut.input_ids == full.input_ids[:64]
    assert cut.n_loss_tokens == 64 - cut.loss_start
