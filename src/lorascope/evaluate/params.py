"""``evaluate`` params: benchmarks per model variant and the recovery table."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from lorascope import paths
from lorascope.sections import PositiveInt, Section

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
