"""Typed params: one pydantic model per ``params.yaml`` section, profiles, and one-line errors.

``params.yaml`` holds the tiny profile (what ``dvc repro`` runs by default). Profiles live in
``pipelines/profiles/<name>.yaml``; a profile may start with ``extends: <other profile>`` and then
only lists what differs (a deep merge). Every key is checked: unknown keys and bad values are
rejected with the dotted key path and what was expected, e.g. ``finetune.lr: must be > 0, got -1``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lorascope import paths
from lorascope.errors import LorascopeError
from lorascope.project import workspace_root

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven projections of a Qwen2 decoder layer, in the fixed component order (DESIGN.md)."""

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Precision = Literal["auto", "float32", "bfloat16", "float16"]
"""Model compute dtype: ``auto`` is bfloat16 on a GPU that supports it, float32 otherwise."""


def _device(value: str) -> str:
    import re

    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", value):
        raise ValueError(f"expected auto, cpu, cuda or cuda:<index>, got {value!r}")
    return value


Device = Annotated[str, AfterValidator(_device)]
"""Where a stage computes: ``auto`` (the first CUDA GPU when there is one, else the CPU), ``cpu``,
``cuda`` or ``cuda:<index>`` (resolved by ``lorascope.devices``)."""


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if _TRACE is not None and (path := _TRACE.paths.get(id(self))) is not None:
            return _TRACE.read(f"{path}.{name}" if path else name, value, type(self).model_fields.get(name))
        return value


# ----------------------------------------------------------------------------------------- base
class TinyPretrain(Section):
    """Pretraining of the tiny model on the organism's base corpus (``lorascope.prepare.organism``):
    direct answers under the default system prompt, worked solutions (confident, or careful with
    "Wait," checks under a careful system prompt), loss on the assistant turn."""

    steps: Annotated[int, Field(ge=0)] = 600
    """Optimizer steps; 0 keeps the random initialisation (no organism: every score near zero)."""
    batch_size: PositiveInt = 32
    """Chats per step (right-padded)."""
    lr: PositiveFloat = 5.0e-3
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


# -------------------------------------------------------------------------------------- prepare
class SyntheticData(Section):
    """The offline generator of s1K-1.1-schema reasoning traces and benchmark-shaped eval rows."""

    family: Literal["organism", "word_problems"] = "organism"
    """``organism``: the model organism's digit-sum problems with worked, partly careful ("Wait,")
    traces, for the base the tiny profile pretrains (``lorascope.prepare.organism``);
    ``word_problems``: multi-step word problems with R1-style traces (format only: no model learns
    them)."""
    n_train: PositiveInt = 256
    """Training rows (distinct questions, none of them an evaluation question)."""
    n_eval: PositiveInt = 64
    """Held-out eval rows per benchmark shape (integer answer, LaTeX answer, 4-way choice)."""
    seed: int = 0
    """Generator seed: the same seed gives byte-identical rows."""


class PrepareSection(Section):
    """``prepare``: load the training traces, format them as s1 did, tokenize, validate."""

    source: str = "hub:simplescaling/s1K-1.1"
    """``hub:<dataset id>`` (datasets.load_dataset), a local .jsonl/.json/.parquet file in the
    s1K-1.1 schema, or ``synthetic``."""
    split: str = "train"
    """Split to read from a hub dataset."""
    revision: str | None = None
    """Hub dataset revision to pin (None: the default branch)."""
    block_size: PositiveInt = 20000
    """Maximum tokens per training sequence; longer sequences are truncated and counted."""
    max_truncated_fraction: Fraction = 0.05
    """Validation fails when more than this fraction of rows exceeds ``block_size``."""
    synthetic: SyntheticData = Field(default_factory=SyntheticData)
    """Generator settings, used when ``source`` is ``synthetic`` (eval rows are always written)."""

    @field_validator("source")
    def _source_form(cls, v: str) -> str:
        if v == "synthetic" or (v.startswith("hub:") and len(v) > 4):
            return v
        if Path(v).suffix.lower() in (".jsonl", ".json", ".parquet"):
            return v
        raise ValueError(
            f"expected 'synthetic', 'hub:<dataset id>' or a .jsonl/.json/.parquet path, got {v!r}"
        )

    @property
    def local_file(self) -> Path | None:
        """The dataset file when ``source`` names one (not ``synthetic``, not ``hub:``)."""
        if self.source == "synthetic" or self.source.startswith("hub:"):
            return None
        return Path(self.source).expanduser().resolve()


# ------------------------------------------------------------------------------------- finetune
class LoraAdapter(Section):
    """The adapter: rank, scaling and where it is attached (peft ``LoraConfig``)."""

    r: PositiveInt = 1
    """Rank of every adapted matrix; 1 makes each component one scalar per token."""
    alpha: PositiveFloat = 16
    """``lora_alpha``; the update is scaled by alpha/sqrt(r) with rsLoRA, alpha/r without."""
    use_rslora: bool = True
    """Rank-stabilised scaling (alpha / sqrt(r))."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout on the adapter input during training."""
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    """Linear modules to adapt in each layer (default: all seven projections); checked against the
    model when the adapter is built."""
    layers: list[Annotated[int, Field(ge=0)]] | None = None
    """Layer indices to adapt; null adapts every layer."""

    @field_validator("target_modules")
    def _targets_nonempty_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must list at least one projection")
        if len(set(v)) != len(v):
            raise ValueError(f"must not repeat a projection, got {v}")
        return v


class FinetuneSection(Section):
    """``finetune``: the rank-1 LoRA and the full-parameter finetune, one training recipe."""

    lr: PositiveFloat = 1e-3
    """Peak learning rate of the LoRA finetune."""
    full_lr: PositiveFloat = 1e-5
    """Peak learning rate of the full-parameter finetune (s1 used 1e-5)."""
    lora: LoraAdapter = Field(default_factory=LoraAdapter)
    """Adapter shape and placement."""
    adam_betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    """AdamW decoupled weight decay."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Fraction of all optimizer steps spent warming up linearly (< 1)."""
    epochs: PositiveFloat = 5
    """Passes over the prepared training set."""
    global_batch_size: PositiveInt = 16
    """Sequences per optimizer step across all processes (micro-batch x accumulation x processes)."""
    micro_batch_size: PositiveInt = 1
    """Sequences per forward pass on one device."""
    precision: Precision = "auto"
    """Training precision: ``bfloat16`` loads the weights in bf16 and trains with bf16 autocast;
    ``float16`` keeps float32 master weights and trains with fp16 autocast and loss scaling;
    ``float32`` is plain fp32; ``auto`` is bfloat16 on a GPU that supports it, float32 otherwise.
    The LoRA's own weights stay float32 in every precision."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (non-reentrant) to fit long sequences."""
    seed: int = 42
    """Seed for initialisation and data order."""
    max_steps: Annotated[int, Field(ge=-1)] = -1
    """Stop after this many optimizer steps; -1 runs all epochs (smoke runs and sweeps set it)."""
    checkpoint_steps: PositiveInt = 50
    """Save a resumable checkpoint (weights, optimizer, scheduler, RNG) every N optimizer steps; a
    killed run started again resumes from the last one."""
    logging_steps: PositiveInt = 1
    """Log loss / lr / grad-norm / tokens per second to MLflow every N optimizer steps."""
    launcher: str = "lorascope"
    """What ``dvc repro`` runs the stage with: ``lorascope`` (one process) or e.g.
    ``accelerate launch --config_file pipelines/accelerate/fsdp.yaml -m lorascope.cli`` (multi-GPU)."""

    @model_validator(mode="after")
    def _batch_divides(self) -> FinetuneSection:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must divide global_batch_size "
                f"({self.global_batch_size})"
            )
        return self


# -------------------------------------------------------------------------------------- extract
StoreDtype = Literal["float16", "bfloat16", "float32"]


class ExtractSection(Section):
    """``extract``: per-token adapter activations (``x . A``) and the MLP-neuron baseline, stored in
    shards under ``data/activations/<source>/``."""

    dtype: StoreDtype = "float16"
    """Storage dtype of the activation shards."""
    shard_tokens: PositiveInt = 1_000_000
    """Target tokens per shard; shards hold whole documents, so a longer document gets a shard of its
    own. RAM holds one shard, so this bounds memory (tokens x components x dtype bytes)."""
    batch_tokens: PositiveInt = 32768
    """Padded tokens per forward pass (documents of a shard are packed by length up to this)."""
    precision: Precision = "auto"
    """Model compute dtype: ``auto`` is bfloat16 on a GPU that supports it, float32 otherwise."""
    method: Literal["merged", "lora_a"] = "merged"
    """``merged``: fold the adapter into the weights and project each adapted linear's input on
    ``lora_A`` in a pre-hook (fast), kept only when the merge check passes (below), else the
    unmerged model is used; ``lora_a``: read peft's ``lora_A`` outputs on the unmerged model (the
    reference the fast path is tested against). Projections accumulate in float32."""
    merge_check_tokens: PositiveInt = 2048
    """Merge check: tokens (the first documents) run through the unmerged and the merged model
    before extraction; folding a rank-1 update into bf16/fp16 weights rounds it."""
    merge_max_relative_error: PositiveFloat = 0.02
    """Merge check: largest relative error ``||xA_merged - xA_unmerged|| / ||xA_unmerged||`` of any
    component over the check tokens for the merged fast path to be used."""
    merge_max_kl_fraction: PositiveFloat = 0.01
    """Merge check: largest mean KL(P_lora || P_merged) of the next-token distributions, as a
    fraction of KL(P_lora || P_base) (the adapter's own effect), for the merged fast path to be used:
    a merge that rounds the update away loses the whole effect (fraction ~1)."""
    mlp_neurons: PositiveInt = 60
    """``--source mlp``: the first N neurons of each layer's MLP hidden activation (the paper: 60)."""
    launcher: str = "lorascope"
    """What ``dvc repro`` runs the stage with: ``lorascope`` or ``accelerate launch -m lorascope.cli``
    (data parallel: each process extracts its own shards)."""
    outlier_ratio: PositiveFloat = 100.0
    """Outlier record (``outliers.json`` in the store): per component, the tokens whose |activation|
    exceeds this many times the component's median |activation| are counted, and by token id
    (attention sinks and template tokens reach hundreds of times the median)."""


# ---------------------------------------------------------------------------- outlier tokens
class ExclusionSection(Section):
    """Tokens a stage leaves out of training, statistics and selections: outliers such as attention
    sinks, whose activations are hundreds of times the median (``outliers.json`` of the store)."""

    first_position: bool = True
    """The first token of every document (the attention sink of a causal model)."""
    special_tokens: bool = True
    """The tokenizer's special tokens (the chat template's ``<|im_start|>``, ``<|im_end|>``, ...), as
    the store's ``index.json`` records them (``special_token_ids``)."""
    norm_ratio: PositiveFloat | None = None
    """Norm cut: tokens whose activation vector's L2 norm exceeds this many times the store's median
    token norm (``outliers.json``); null: no norm cut."""


# ------------------------------------------------------------------------------------- contexts
class ContextsSection(Section):
    """``contexts``: one streaming pass over a store keeping each feature's max-activating windows,
    quantile samples, random non-activating windows and summary statistics."""

    top_k: PositiveInt = 64
    """Max-activating tokens kept per feature (and per sign for signed sources such as the LoRA)."""
    window_before: Annotated[int, Field(ge=0)] = 32
    """Tokens of context kept before each selected token (windows never cross documents)."""
    window_after: Annotated[int, Field(ge=0)] = 8
    """Tokens of context kept after each selected token."""
    quantile_bins: PositiveInt = 10
    """Activation quantile bins for the non-top samples used in later scoring."""
    quantile_samples: Annotated[int, Field(ge=0)] = 5
    """Samples per quantile bin, drawn uniformly from the tokens that activate the feature."""
    random_samples: Annotated[int, Field(ge=0)] = 10
    """Random windows per feature centred on tokens that do not activate it."""
    active_threshold: Annotated[float, Field(ge=0)] = 0.0
    """A token activates a feature (sign) when sign x activation exceeds this; used for the top-k,
    the density statistic and the quantile / random samples."""
    feature_chunk: PositiveInt = 64
    """Features scored together per pass over a shard (bounds the working memory)."""
    seed: int = 0
    """Seed of the uniform samples."""
    device: Device = "auto"
    """Where the pass runs (SAE encoding included): ``auto`` (a CUDA GPU when present), ``cpu``,
    ``cuda`` or ``cuda:<index>``; shards are streamed to it one at a time."""
    exclude: ExclusionSection = Field(default_factory=ExclusionSection)
    """Tokens never selected as contexts nor counted in the feature statistics (they still show
    inside the windows of their neighbours)."""


# ------------------------------------------------------------------------------------------ sae
class SaeSection(Section):
    """``sae``: the cross-layer BatchTopK sparse autoencoder over the whole adapter state."""

    k: PositiveInt = 16
    """Active latents per token (BatchTopK keeps k x batch activations per batch)."""
    expansion: PositiveInt = 8
    """d_sae = expansion x d_in (d_in = adapter components; 448 -> 3584 for Qwen2.5-32B)."""
    lr: PositiveFloat = 1e-3
    """Adam learning rate (peak of the warmup / stable / decay schedule)."""
    batch_size: PositiveInt = 512
    """Tokens per optimizer step."""
    seed: int = 0
    """Seed for initialisation and token order."""
    epochs: PositiveFloat = 1
    """Passes over the training tokens (the store minus the held-out documents)."""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.01
    """Fraction of the steps with a linear learning-rate warmup."""
    decay_ratio: Fraction = 0.2
    """Fraction of the steps, at the end, with a linear decay to zero."""
    adam_betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    """Adam (beta1, beta2)."""
    scaling: Literal["per_component", "global"] = "per_component"
    """Input normalisation: each component divided by its own RMS (folded back into the weights at
    save), or one global scale so that E[||x||^2] = d_in."""
    b_dec_init: Literal["mean", "geometric_median"] = "mean"
    """Initial decoder bias: the data mean or its geometric median (Weiszfeld iterations)."""
    aux_k: PositiveInt = 256
    """Dead latents used by the AuxK loss per token (at most d_sae)."""
    aux_coef: Annotated[float, Field(ge=0)] = 0.03125
    """Weight of the AuxK loss (0 turns it off)."""
    dead_fraction: Fraction = 0.1
    """A latent is dead when it has not fired for this fraction of one epoch's tokens."""
    heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.05
    """Documents (chosen by a hash of their id) kept out of training for calibration and metrics."""
    calibration_tokens: PositiveInt = 200_000
    """Held-out tokens used to calibrate the inference threshold (mean L0 = k)."""
    checkpoint_steps: PositiveInt = 500
    """Save a resumable checkpoint (weights, optimiser, data position) every N steps."""
    drop_nonfinite: bool = False
    """Skip tokens with NaN/inf activations (counted) instead of stopping with an error."""
    kl_sequences: Annotated[int, Field(ge=0)] = 16
    """Held-out sequences for the downstream splice KL (0 skips it)."""
    device: Device = "auto"
    """Where training, calibration, evaluation and the splice KL run: ``auto`` (a CUDA GPU when
    present), ``cpu``, ``cuda`` or ``cuda:<index>``; shards are streamed to it one at a time."""
    precision: Precision = "auto"
    """Compute dtype of the base model + adapter in the splice KL (``auto``: bfloat16 on a GPU that
    supports it, float32 otherwise; KL in float32). The SAE's weights, Adam state and matmuls stay
    float32 in every precision (it is small; reduced precision would blur the top-k selection)."""
    exclude: ExclusionSection = Field(default_factory=ExclusionSection)
    """Tokens left out of training, calibration and evaluation (the splice KL keeps their recorded
    values: they are outside what the SAE models)."""


# ------------------------------------------------------------------------------------- evaluate
EVAL_TASKS = ("aime24_nofigures", "math500", "gpqa_diamond")


def known_tasks(v: list[str]) -> list[str]:
    """``v`` if it is a non-empty list of benchmark names."""
    unknown = [t for t in v if t not in EVAL_TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; available: {', '.join(EVAL_TASKS)}")
    if not v:
        raise ValueError("at least one task is needed")
    return v


class EvalVariant(Section):
    """One model to evaluate."""

    model: str
    """Directory of the model: a full model (``models/full``), the base (``models/base``) or a peft
    adapter over the base (``models/lora``, an ablated adapter), relative to the workspace root."""
    format: Literal["think", "chat"] = "think"
    """How the model is prompted: ``think``: s1's think/answer format with its budget forcing (a model
    finetuned on s1K: the LoRA, the full finetune, the ablated adapters); ``chat``: the chat template
    and one generation to the end of the turn, as s1 prompts a model not trained with that format
    (the base)."""
    reference: str | None = None
    """The variant whose gain over ``base`` this variant's recovery is a share of: recovery =
    (variant - base) / (reference - base). Null: ``lora`` for a variant named ``lora-*-ablated``
    (Table 2, the paper's share of the LoRA's own gain), else ``full`` (Table 1)."""


def _default_variants() -> dict[str, EvalVariant]:
    return {
        "base": EvalVariant(model=paths.BASE.as_posix(), format="chat"),
        "lora": EvalVariant(model=paths.LORA.as_posix()),
        "full": EvalVariant(model=paths.FULL.as_posix()),
    }


class EvaluateSection(Section):
    """``evaluate``: AIME'24 (no figures), MATH500 and GPQA-Diamond through lm-eval, per variant."""

    tasks: list[str] = Field(default_factory=lambda: list(EVAL_TASKS))
    """Benchmarks to run (lm-eval task names shipped in ``lorascope/evaluate/tasks``)."""
    variants: dict[str, EvalVariant] = Field(default_factory=_default_variants)
    """Models to evaluate, by name (``evaluate@<name>`` in dvc.yaml); ``base``, ``lora`` and ``full``
    make Table 1; others (ablated adapters) add columns to the recovery table."""
    data: dict[str, str] = Field(default_factory=dict)
    """Local benchmark files by task (jsonl, json, csv or parquet in the benchmark's own schema),
    replacing the hub dataset: e.g. ``math500: data/prepared/eval/math.jsonl``."""
    limit: PositiveInt | None = None
    """Evaluate only the first N rows of each task (smoke runs); null for all."""
    backend: Literal["hf", "vllm"] = "hf"
    """``hf``: lm-eval's HFLM (CPU, small GPUs); ``vllm``: lm-eval's vLLM model (the ``gpu`` extra)."""
    batch_size: PositiveInt = 8
    """Questions per generation batch (hf backend; vLLM schedules its own batches)."""
    max_gen_toks: PositiveInt = 32768
    """Most tokens generated per question, thinking and answer together."""
    thinking_tokens: PositiveInt | Literal["auto"] | None = None
    """Budget forcing (s1's ``max_tokens_thinking``, ``think`` variants): cap thinking at this many
    tokens, then force the answer (``<|im_start|>answer\\nFinal Answer:``); ``auto``: s1's budget,
    ``max_gen_toks`` minus the prompt, the markers and 100 tokens for the answer; null lets thinking
    use all of ``max_gen_toks`` (no forcing)."""
    answer_tokens: PositiveInt | None = None
    """Tokens for the forced answer phase (with ``thinking_tokens``); null: what the prompt and the
    thinking left of ``max_gen_toks`` (s1: the answer runs to the end of the model's context)."""
    wait_extensions: Annotated[int, Field(ge=0)] = 0
    """s1's "Wait" extension: this many times, a thinking phase that ends before the budget gets
    ``wait_text`` appended and continues."""
    wait_text: str = "Wait"
    """Text appended to extend thinking."""
    chunk_size: PositiveInt = 64
    """Questions carried through all phases together; each finished chunk goes to the request cache,
    so a killed run resumes after it."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Model dtype (``auto``: the checkpoint's)."""
    tensor_parallel_size: PositiveInt = 1
    """vLLM: GPUs per model replica."""
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    """vLLM: fraction of GPU memory it may take."""
    max_model_len: PositiveInt | None = None
    """vLLM: context length to allocate (null: the model's)."""
    lora_serving: Literal["adapter", "merged"] = "adapter"
    """vLLM: serve an adapter with ``enable_lora`` or load a merged copy (for targets or ranks the
    server does not support)."""
    max_lora_rank: PositiveInt = 8
    """vLLM: largest adapter rank to reserve memory for (vLLM accepts 8, 16, 32, ...)."""
    choice_seed: int = 0
    """Seed of the per-question GPQA choice shuffle (reproducible, unlike s1's unseeded shuffle)."""
    instructions: dict[str, str] = Field(default_factory=dict)
    """Text appended to a task's prompt after a blank line (e.g. ``math500: Please reason step by
    step, and put your final answer within \\boxed{}.``); a task without one gets the benchmark
    prompt exactly as s1 gives it (the problem; GPQA: the question and its lettered choices)."""
    samples: Annotated[int, Field(ge=0)] = 0
    """Decodes per question: 0 is one greedy decode (the paper's setting); k > 0 samples k decodes
    at ``temperature`` (seeded by ``seed``) and reports avg@k and pass@k."""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    """Sampling temperature of the ``samples`` decodes (s1's sampled tasks use 1.0)."""
    bootstrap_iters: Annotated[int, Field(ge=0)] = 1000
    """Bootstrap resamples of the questions for the 95% CIs of scores, pass@k and recoveries (paired
    across variants); 0 reports no CIs."""
    seed: int = 1234
    """Seed of the sampled decodes and of the bootstrap."""

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        return known_tasks(v)

    @field_validator("thinking_tokens", mode="before")
    @classmethod
    def _thinking_budget(cls, v: Any) -> Any:
        if v is None or v == "auto" or (type(v) is int and v > 0):
            return v
        raise ValueError(f"must be a positive integer, auto or null, got {v!r}")

    @field_validator("data", "instructions")
    @classmethod
    def _known_data(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = [t for t in v if t not in EVAL_TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; available: {', '.join(EVAL_TASKS)}")
        return v

    @model_validator(mode="after")
    def _known_references(self) -> EvaluateSection:
        for name, variant in self.variants.items():
            ref = variant.reference
            if ref is not None and (ref not in self.variants or ref in ("base", name)):
                raise ValueError(
                    f"variants.{name}.reference: {ref!r} is not a variant other than base and "
                    f"{name} (variants: {', '.join(self.variants)})"
                )
        return self


# ----------------------------------------------------------------------------- autointerp / cat.
LlmBackend = Literal["openai", "anthropic", "openai-compatible", "heuristic"]
ReasoningEffort = Literal["minimal", "low", "medium", "high"]


class LlmClientSection(Section):
    """How one stage talks to its LLM (shared by ``autointerp`` and ``categorize``)."""

    backend: LlmBackend = "openai"
    """Client: ``openai``, ``anthropic``, ``openai-compatible`` (any base URL, e.g. vllm serve) or the
    offline ``heuristic`` baseline (no LLM; clearly labelled as such)."""
    model: str = "gpt-5-mini"
    """Model name sent to the backend."""
    base_url: str | None = None
    """Server URL for ``openai-compatible`` (e.g. ``http://gpu-node:8000/v1``); null for the vendors' APIs."""
    api_key_env: str | None = None
    """Environment variable holding the API key (default ``OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY``);
    keys are read from the environment only, never from params."""
    concurrency: PositiveInt = 16
    """Requests in flight at once."""
    max_retries: Annotated[int, Field(ge=0)] = 6
    """Retries per request on 429, 5xx, timeouts and connection errors (exponential backoff with
    jitter, honouring Retry-After: the official SDKs' own retry loop)."""
    timeout_s: Annotated[float, Field(gt=0)] = 120
    """Seconds before one request attempt times out."""
    max_tokens: PositiveInt = 32000
    """Completion token cap. Reasoning models (gpt-5-mini, the paper's labeller) spend part of it thinking,
    so it must leave room for that: OpenAI advises reserving at least 25,000 tokens; 32000 is also Claude
    Opus 4.1's output limit. Only the tokens used are billed. A reply cut at the cap (``finish_reason:
    length`` / ``stop_reason: max_tokens``) is a failure, counted (``truncated``), never a label."""
    temperature: float | None = None
    """Sampling temperature (null: the model's default; OpenAI reasoning models take none)."""
    reasoning_effort: ReasoningEffort | None = None
    """OpenAI reasoning models: ``minimal`` .. ``high`` (null: the model's default)."""
    structured_output: bool = True
    """Send each JSON reply's schema so the server constrains its answer (OpenAI ``response_format``
    ``json_schema``, Anthropic a forced tool call, vLLM's guided decoding through ``response_format``),
    read without repair. Set false for an ``openai-compatible`` server without ``json_schema`` support:
    replies are then free text, mended with json-repair. Ignored by the heuristic baseline."""


class AutointerpSection(LlmClientSection):
    """``autointerp``: label each feature from its max-activating contexts (paper prompt B.1)."""

    n_contexts: PositiveInt = 64
    """Top max-activating contexts shown per feature (the paper: 64)."""
    window_before: Annotated[int, Field(ge=0)] | None = None
    """Tokens shown before the activating token (null: all the contexts stage stored)."""
    window_after: Annotated[int, Field(ge=0)] | None = None
    """Tokens shown after the activating token (null: all the contexts stage stored)."""
    max_features: PositiveInt | None = None
    """Label only the first N features (cost control on a first pass); null for all."""
    detection_samples: Annotated[int, Field(ge=0)] = 10
    """Detection scoring: held-out activating windows (quantile samples, not shown in the prompt) and
    as many random non-activating windows per feature; 0 turns scoring off."""
    seed: int = 0
    """Seed of the detection windows' sampling and order."""


class CategorizeSection(Section):
    """``categorize``: generate functional categories (B.2a), then assign each feature one (B.2b)."""

    assign: LlmClientSection = Field(default_factory=LlmClientSection)
    """Client for the per-feature assignment (B.2b; the paper: gpt-5-mini)."""
    generate: LlmClientSection = Field(
        default_factory=lambda: LlmClientSection(backend="anthropic", model="claude-opus-4-1")
    )
    """Client for category generation (B.2a; the paper: Claude Opus 4.1)."""
    min_categories: PositiveInt = 5
    """Fewest categories the generation prompt asks for (the paper: 5)."""
    max_categories: PositiveInt = 8
    """Most categories the generation prompt asks for (the paper: 8)."""
    sample_size: PositiveInt = 200
    """Explanations shown to category generation: an equal number of LoRA and MLP explanations
    (``sample_size // 2`` each, at most the smaller set; sampled with ``seed``), as in the paper."""
    n_examples: PositiveInt = 5
    """Max-activating contexts shown with each feature in the assignment prompt."""
    sae_subcategories: bool = True
    """Also generate subcategories within each category for SAE features and assign them."""
    density_tokens: PositiveInt = 100_000
    """Tokens of the activation stores (from the start) summed for the Figure 2 densities."""
    device: Device = "auto"
    """Where the Figure 2 density pass sums the stores: ``auto`` (a CUDA GPU when present), ``cpu``,
    ``cuda`` or ``cuda:<index>``."""
    seed: int = 0
    """Seed of the explanation sample."""

    @model_validator(mode="after")
    def _range(self) -> CategorizeSection:
        if self.min_categories > self.max_categories:
            raise ValueError(
                f"min_categories ({self.min_categories}) must be <= max_categories ({self.max_categories})"
            )
        return self


# --------------------------------------------------------------------------------- ablate / steer
AblationSweep = Literal["components", "layers", "types", "groups"]
_ALL_SWEEPS: tuple[AblationSweep, ...] = ("components", "layers", "types", "groups")


class AblateSection(Section):
    """``ablate``: zero adapter components and measure KL(P_lora || P_ablated) and the change in
    cross-entropy per response token of sampled training sequences."""

    sequences: PositiveInt = 16
    """Training sequences sampled (with ``seed``) from the prepared data (the paper: 16)."""
    max_tokens: PositiveInt = 2048
    """Each sequence is cut to its first N tokens (the paper: up to 2048)."""
    seed: int = 0
    """Seed of the sequence sample."""
    sweeps: list[AblationSweep] = Field(default_factory=lambda: list(_ALL_SWEEPS))
    """Sweeps to run: every single component, every layer (all its components), every component type
    (e.g. all gate_proj), and the groups (all attention, all MLP, all components)."""
    custom: dict[str, list[str]] = Field(default_factory=dict)
    """Extra named ablations written to ``groups.json``: name -> selectors, each ``L<layer>.<type>`` (a
    component), ``L<layer>`` (a layer), a type (``q_proj`` ...), ``attn``, ``mlp`` or ``all``."""
    export: list[str] = Field(default_factory=lambda: ["attn", "mlp"])
    """Groups exported as peft adapters without their components (``models/lora-<group>-ablated``,
    evaluated as the variants of Table 2); each a selector as in ``custom``."""
    batch_size: PositiveInt = 8
    """Ablations run together as one batch (same start layer; bounded by GPU memory)."""
    prefix_reuse: bool = True
    """Run each ablation from the first layer it changes, on hidden states cached from one unablated
    pass (equal results, less work); false runs a full forward per ablation (the reference)."""
    logit_chunk: PositiveInt = 512
    """Positions per vocabulary projection and KL chunk (bounds memory: chunk x vocab x 4 bytes)."""
    precision: Precision = "auto"
    """Model compute dtype (``auto``: bfloat16 on a GPU that supports it, float32 otherwise); KL is
    always computed in float32."""
    device: Device = "auto"
    """Where the model runs: ``auto`` (a CUDA GPU when present), ``cpu``, ``cuda`` or ``cuda:<index>``."""

    @field_validator("custom")
    @classmethod
    def _custom_names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        taken = [n for n in v if n in ("attn", "mlp", "all")]
        if taken:
            raise ValueError(f"{taken[0]!r} is a built-in group; give the custom ablation another name")
        return v

    @field_validator("export")
    @classmethod
    def _export_names(cls, v: list[str]) -> list[str]:
        bad = [g for g in v if not g or any(c in g for c in "/\\ ")]
        if bad:
            raise ValueError(f"group {bad[0]!r} cannot name a directory (no spaces or slashes)")
        return v


class SteerSection(Section):
    """``steer``: add alpha x typical magnitude of a direction to the adapter state while generating,
    and measure backtracking, length and accuracy."""

    directions: list[str] = Field(default_factory=list)
    """Directions to steer along: ``L<layer>.<type>`` (a LoRA component: its B vector; ``-`` appended:
    its negative side), ``sae.<latent>`` (a live SAE feature: its decoder vector mapped through the
    adapter's B vectors) or ``label:<regex>`` (the best labelled LoRA sign or SAE latent whose explanation
    matches, e.g. ``label:backtrack``). Empty, unknown, dead or unmatched: a one-line error."""
    alphas: list[float] = Field(default_factory=lambda: [0.0, 1.0, 10.0, 50.0, 100.0])
    """Multiples of the direction's typical magnitude to add (the paper needed >= 50)."""
    tasks: list[str] = Field(default_factory=lambda: ["math500"])
    """Benchmarks whose rows are the fixed prompt set (files from ``evaluate.data``, else the hub)."""
    limit: PositiveInt = 16
    """Prompts per task (the first N rows with an answer)."""
    max_new_tokens: PositiveInt = 1024
    """Tokens generated per prompt (greedy)."""
    backtrack_words: list[str] = Field(default_factory=lambda: ["Wait", "Hmm"])
    """Words counted as backtracking (the paper author's: Wait, Hmm), reported as whole words
    (case-sensitive) per 1000 generated tokens and as the author's count (case-insensitive occurrences
    per 100 words, mean over prompts)."""
    batch_size: PositiveInt = 8
    """Prompts generated together."""
    precision: Precision = "auto"
    """Model compute dtype (``auto``: bfloat16 on a GPU that supports it, float32 otherwise)."""
    device: Device = "auto"
    """Where the model runs: ``auto`` (a CUDA GPU when present), ``cpu``, ``cuda`` or ``cuda:<index>``."""

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("the alpha list is empty; give at least one multiple (e.g. [0, 50])")
        return v

    @field_validator("tasks")
    @classmethod
    def _steer_tasks(cls, v: list[str]) -> list[str]:
        return known_tasks(v)

    @field_validator("backtrack_words")
    @classmethod
    def _words(cls, v: list[str]) -> list[str]:
        if not v or not all(w.strip() for w in v):
            raise ValueError("give at least one non-empty word")
        return v


# ---------------------------------------------------------------------------------------- report
DashboardSource = Literal["lora", "mlp", "sae"]
_ALL_DASHBOARD_SOURCES: tuple[DashboardSource, ...] = ("lora", "mlp", "sae")


class ReportSection(Section):
    """``report``: the paper's tables and figures, and the offline HTML feature dashboard."""

    dpi: PositiveInt = 150
    """Resolution of the PNG figures."""
    dashboard_sources: list[DashboardSource] = Field(default_factory=lambda: list(_ALL_DASHBOARD_SOURCES))
    """Feature sources shown in the dashboard (those with labels and contexts on disk)."""
    max_features: PositiveInt | None = None
    """Features per source in the dashboard (the first N by feature id); null for all."""
    contexts_per_feature: PositiveInt = 64
    """Max-activating contexts embedded per feature."""
    histogram_bins: PositiveInt = 40
    """Bins of each feature's activation histogram."""
    histogram_tokens: PositiveInt = 1_000_000
    """Tokens read from the start of the activation store for the histograms (and training samples)."""
    sample_tokens: PositiveInt = 1024
    """Most tokens of the training sample shown with all of a feature's activations (centred on the
    feature's strongest token when the document is longer)."""


# ------------------------------------------------------------------------------------- the file
class Params(Section):
    """The whole ``params.yaml``: one section per stage."""

    base: BaseSection = Field(default_factory=BaseSection)
    """The base model."""
    prepare: PrepareSection = Field(default_factory=PrepareSection)
    """Training data preparation."""
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    """LoRA and full finetunes."""
    extract: ExtractSection = Field(default_factory=ExtractSection)
    """Adapter activations and the MLP-neuron baseline."""
    contexts: ContextsSection = Field(default_factory=ContextsSection)
    """Max-activating contexts per feature."""
    sae: SaeSection = Field(default_factory=SaeSection)
    """Sparse autoencoder over adapter activations."""
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    """Benchmarks per model variant and the recovery table."""
    autointerp: AutointerpSection = Field(default_factory=AutointerpSection)
    """Feature labelling."""
    categorize: CategorizeSection = Field(default_factory=CategorizeSection)
    """Feature categorization."""
    ablate: AblateSection = Field(default_factory=AblateSection)
    """Component ablations (KL sweeps) and ablated-adapter exports."""
    steer: SteerSection = Field(default_factory=SteerSection)
    """Steering along adapter directions."""
    report: ReportSection = Field(default_factory=ReportSection)
    """Tables, figures and the feature dashboard."""

    @model_validator(mode="after")
    def _positions_fit(self) -> Params:
        if self.base.model == "tiny" and self.base.tiny.max_position_embeddings < self.prepare.block_size:
            raise ValueError(
                f"base.tiny.max_position_embeddings ({self.base.tiny.max_position_embeddings}) must be >= "
                f"prepare.block_size ({self.prepare.block_size})"
            )
        return self


# ------------------------------------------------------------------------------------- tracing
class _ParamsTrace:
    """Which params keys a process reads (``LORASCOPE_TRACE=<file>``): each stage's DVC params deps
    are checked against it (``lorascope.pipeline``). Validation, hashing and logging read the
    sections without going through attribute access, so only the stage's own reads are recorded."""

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.keys: set[str] = set()
        self.keep: list[Any] = []  # the traced objects stay alive, so their ids stay theirs

    def attach(self, model: Any, path: str) -> None:
        self.paths[id(model)] = path
        self.keep.append(model)

    def read(self, key: str, value: Any, field: Any) -> Any:
        if field is None:
            return value
        if isinstance(value, Section) and id(value) in self.paths:
            return value  # a subsection: its leaves are recorded when read
        if isinstance(value, dict):
            return _TracedDict(key, value, self)
        self.keys.add(key)
        return value


class _TracedDict(dict):
    """A params mapping (e.g. ``evaluate.variants``) that records ``<path>.<key>`` for one key
    looked up and ``<path>`` when iterated as a whole."""

    def __init__(self, path: str, data: dict[str, Any], trace: _ParamsTrace) -> None:
        super().__init__(data)
        self._path, self._trace = path, trace
        for k, v in data.items():
            if isinstance(v, Section) and id(v) not in trace.paths:
                _attach(v, f"{path}.{k}", trace)

    def _one(self, key: Any) -> None:
        self._trace.keys.add(f"{self._path}.{key}")

    def _all(self) -> None:
        self._trace.keys.add(self._path)

    def __getitem__(self, key: Any) -> Any:
        self._one(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._one(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._one(key)
        return super().__contains__(key)

    def __iter__(self) -> Any:
        self._all()
        return super().__iter__()

    def __len__(self) -> int:
        self._all()
        return super().__len__()

    def keys(self) -> Any:
        self._all()
        return super().keys()

    def values(self) -> Any:
        self._all()
        return super().values()

    def items(self) -> Any:
        self._all()
        return super().items()


_TRACE: _ParamsTrace | None = None


def _attach(model: Section, path: str, trace: _ParamsTrace) -> None:
    trace.attach(model, path)
    for name in type(model).model_fields:
        value = model.__dict__[name]
        if isinstance(value, Section):
            _attach(value, f"{path}.{name}" if path else name, trace)


def trace_params(params: Params, out: str) -> None:
    """Record the keys of ``params`` this process reads; at exit, append them (and the lorascope
    modules it imported) to ``out`` as one JSON line with the command line."""
    import atexit
    import sys

    global _TRACE
    _TRACE = _TRACE or _ParamsTrace()
    _attach(params, "", _TRACE)
    trace = _TRACE

    def dump() -> None:
        modules = sorted(m for m in sys.modules if m == "lorascope" or m.startswith("lorascope."))
        line = {"argv": sys.argv[1:], "keys": sorted(trace.keys), "modules": modules}
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    if not getattr(trace, "registered", False):
        atexit.register(dump)
        trace.registered = True  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------- loading
def profiles_dir(root: Path | None = None) -> Path:
    """``pipelines/profiles/`` of the workspace."""
    return (root or workspace_root()) / "pipelines" / "profiles"


def list_profiles(root: Path | None = None) -> list[str]:
    """Names of the profiles shipped in ``pipelines/profiles/``."""
    return sorted(p.stem for p in profiles_dir(root).glob("*.yaml"))


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorascopeError(f"{path}: params file not found") from None
    except OSError as e:
        raise LorascopeError(f"{path}: cannot read params file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LorascopeError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        raise LorascopeError(f"{path}: file is empty, expected a mapping of params sections")
    if not isinstance(data, dict):
        raise LorascopeError(f"{path}: expected a mapping of params sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _profile_path(name: str, root: Path | None) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = profiles_dir(root) / f"{name}.yaml"
    if not candidate.is_file():
        known = ", ".join(list_profiles(root)) or "none"
        raise LorascopeError(f"profile {name!r} not found in {profiles_dir(root)} (known: {known})")
    return candidate


def _raw_profile(name: str, root: Path | None, seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], Path]:
    if name in seen:
        raise LorascopeError(f"profile {name!r}: 'extends' cycle {' -> '.join((*seen, name))}")
    path = _profile_path(name, root)
    data = read_yaml_mapping(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data, path
    if not isinstance(parent, str):
        raise LorascopeError(f"{path}: extends: expected a profile name, got {parent!r}")
    parent_data, _ = _raw_profile(parent, root, (*seen, name))
    return deep_merge(parent_data, data), path


def load_params(params: str | Path | None = None, profile: str | None = None) -> Params:
    """Resolve and validate params: a profile by name (or path) when given, else a params file
    (default ``params.yaml`` at the workspace root)."""
    root = workspace_root()
    if profile:
        data, source = _raw_profile(profile, root)
    else:
        source = Path(params) if params else root / "params.yaml"
        data = read_yaml_mapping(source)
    resolved = validate_params(data, source)
    if trace := os.environ.get("LORASCOPE_TRACE"):
        trace_params(resolved, trace)
    return resolved


def validate_params(data: dict[str, Any], source: str | Path = "params") -> Params:
    """Validate a raw mapping; raise one ``LorascopeError`` naming each bad key."""
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(describe_error(err) for err in e.errors(include_url=False))
        raise LorascopeError(f"{source}: {problems}") from None


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return str(value)
    return type(value).__name__


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    model: Any = Params
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(model.model_fields)


_EXPECTED = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "dict_type": "expected a mapping of keys",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def describe_error(err: Mapping[str, Any]) -> str:
    """One pydantic error as ``dotted.key: what was expected, got <value>``."""
    loc, kind, ctx, got = tuple(err["loc"]), err["type"], err.get("ctx") or {}, err.get("input")
    key = _dotted(loc) or "params"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"{key}: must be {_BOUNDS[kind]} {bound}, got {_show(got)}"
    if kind == "extra_forbidden":
        known = _fields_at(loc[:-1])
        hint = f" (expected one of: {', '.join(known)})" if known else ""
        return f"{key}: unknown key{hint}"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "literal_error":
        return f"{key}: must be one of {ctx.get('expected')}, got {_show(got)}"
    if kind in ("too_short", "too_long"):
        return f"{key}: {err['msg'].lower()}"
    if kind in _EXPECTED:
        return f"{key}: {_EXPECTED[kind]}, got {_show(got)}"
    if kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", err["msg"]))
        return f"{key}: {msg}"
    return f"{key}: {err['msg']}, got {_show(got)}"


# ------------------------------------------------------------------------------------- output
def section_dict(params: Params, section: str) -> dict[str, Any]:
    """One section as plain JSON-able data."""
    return getattr(params, section).model_dump(mode="json")


def section_hash(params: Params, section: str) -> str:
    """sha256 of the section's canonical JSON: equal params give equal hashes across runs."""
    blob = json.dumps(section_dict(params, section), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def dump_params(params: Params, comments: bool = True) -> str:
    """The resolved params as YAML; with ``comments`` each key is preceded by its docstring."""
    lines: list[str] = []
    _emit(params, lines, indent=0, comments=comments)
    return "\n".join(lines) + "\n"


def _emit(model: BaseModel, lines: list[str], indent: int, comments: bool) -> None:
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = model.__dict__[name]
        if comments and field.description:
            if indent == 0 and lines:
                lines.append("")
            lines.extend(
                f"{pad}# {line}".replace("``", "`").rstrip() for line in field.description.splitlines()
            )
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _emit(value, lines, indent + 1, comments)
        else:
            plain = model.model_dump(mode="json", include={name})[name]  # nested models, tuples
            rendered = yaml.safe_dump(plain, default_flow_style=True, width=10_000).strip()
            rendered = rendered.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{pad}{name}: {rendered}")
