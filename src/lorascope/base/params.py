"""``base`` params: the base model (a tiny Qwen2 built here, or a pinned real one)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from lorascope.sections import PositiveFloat, PositiveInt, Section


class TinyPretrain(Section):
    """Pretraining of the tiny model on the organism's base corpus (``lorascope.organism``):
    direct answers under the default system prompt, worked solutions (confident, or careful with
    "Wait," checks under a careful system prompt), loss on the assistant turn."""

    steps: Annotated[int, Field(ge=0)] = 2400
    """Optimizer steps; 0 keeps the random initialisation (no organism: every score near zero)."""
    batch_size: PositiveInt = 8
    """Chats per step (right-padded). Many small steps: 600 steps of 32 formed the lookup of a digit by its name on one
    seed in three; 1600 steps of 8 on 8 of 10 (base seeds 5 and 9 fell short: 65% of seed 5's lookups right); 2400 on all ten."""
    lr: PositiveFloat = 1.0e-2
    """Peak AdamW learning rate (5% linear warmup, cosine decay to zero, gradient norm clipped at 1)."""


class TinyModel(Section):
    """Architecture of the Qwen2 built by the ``base`` stage (tiny profile), and its pretraining."""

    hidden_size: PositiveInt = 64
    """Width of the residual stream."""
    intermediate_size: PositiveInt = 128
    """Width of each MLP's hidden layer (the input of ``down_proj``)."""
    num_hidden_layers: PositiveInt = 2
    """Number of decoder layers; components = layers x adapted projections."""
    num_attention_heads: PositiveInt = 4
    """Query heads per layer; must divide ``hidden_size``."""
    num_key_value_heads: PositiveInt = 2
    """Key/value heads per layer (grouped-query attention); must divide ``num_attention_heads``."""
    max_position_embeddings: PositiveInt = 4096
    """Longest sequence the rotary embeddings are set up for; at least ``prepare.block_size``."""
    rope_theta: PositiveFloat = 10000.0
    """Base of the rotary embedding's frequencies. A large base (the organism's 1e6, as Qwen2.5's own) turns
    most of a head's dimensions slowly, so a head can match a key by content across the question (the
    organism's lookup of a digit by its name) instead of only nearby."""
    vocab_size: Annotated[int, Field(ge=300)] = 2048
    """Target vocabulary of the byte-level BPE tokenizer trained on the synthetic corpus (>= 300:
    256 byte symbols plus the special tokens)."""
    tokenizer_corpus_rows: PositiveInt = 400
    """Chats of the organism's base corpus the tokenizer is trained on."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the LM head (as the small Qwen2.5 models do)."""
    pretrain: TinyPretrain = Field(default_factory=TinyPretrain)
    """Pretraining on the organism's base corpus (seeded by ``base.seed``)."""

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModel:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        return self


class BaseSection(Section):
    """``base``: the model every later stage adapts, probes and ablates."""

    model: str = "Qwen/Qwen2.5-32B-Instruct"
    """``tiny`` builds a random Qwen2 from ``base.tiny``; anything else is a Hugging Face hub id or a
    local model directory, recorded in ``models/base/reference.json`` and never copied."""
    revision: str = "main"
    """Hub branch, tag or commit to pin; the resolved commit is written to ``reference.json``."""
    seed: int = 0
    """Seed for the tiny model's weights and its tokenizer corpus."""
    tiny: TinyModel = Field(default_factory=TinyModel)
    """Architecture used when ``model`` is ``tiny``."""

    @field_validator("model")
    def _model_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be 'tiny', a hub id or a local path, got an empty string")
        return v
