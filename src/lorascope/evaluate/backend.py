"""Build the lm-eval model for one variant: ``hf`` (HFLM, ``peft=`` for adapters) or ``vllm``.

Both get the budget-forcing mixin (``forcing.py``). vLLM is imported only when that backend is
built; its arguments are built by a plain function so they are tested without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorascope.config import EvaluateSection
from lorascope.errors import LorascopeError
from lorascope.evaluate.forcing import Budget


@dataclass(frozen=True)
class ModelSpec:
    """What to load for a variant: the weights (hub id or directory, revision), the tokenizer and
    the peft adapter applied on top, if any."""

    pretrained: str
    revision: str | None
    tokenizer: str
    adapter: Path | None


def resolve(base_dir: Path, model_dir: Path) -> ModelSpec:
    """A variant's directory is an adapter over the base (``adapter_config.json``), a full model
    (``config.json``) or the base itself (``config.json`` or ``reference.json``)."""
    from lorascope.base.load import source

    base, base_rev = source(base_dir)
    if (model_dir / "adapter_config.json").is_file():
        return ModelSpec(base, base_rev, base, model_dir)
    if model_dir.resolve() == base_dir.resolve():
        return ModelSpec(base, base_rev, base, None)
    if (model_dir / "config.json").is_file():
        return ModelSpec(str(model_dir), None, base, None)
    raise LorascopeError(
        f"{model_dir}: not a model (expected adapter_config.json or config.json); "
        "run the stage that writes it (e.g. `lorascope finetune`) first"
    )


def budget(cfg: EvaluateSection) -> Budget:
    return Budget(
        max_gen_toks=cfg.max_gen_toks,
        thinking_tokens=cfg.thinking_tokens,
        answer_tokens=cfg.answer_tokens,
        wait_extensions=cfg.wait_extensions,
        wait_text=cfg.wait_text,
        chunk_size=cfg.chunk_size,
    )


def hf_args(cfg: EvaluateSection, spec: ModelSpec, device: str) -> dict[str, Any]:
    """lm-eval ``HFLM`` arguments: batched greedy generation, the adapter through ``peft=`` (token
    limits travel with each request)."""
    args: dict[str, Any] = {
        "pretrained": spec.pretrained,
        "tokenizer": spec.tokenizer,
        "device": device,
        "dtype": cfg.dtype,
        "batch_size": cfg.batch_size,
        "trust_remote_code": False,
    }
    if spec.revision:
        args["revision"] = spec.revision
    if spec.adapter is not None:
        args["peft"] = str(spec.adapter)
    return args


def vllm_args(cfg: EvaluateSection, spec: ModelSpec, merged: Path | None = None) -> dict[str, Any]:
    """lm-eval ``VLLM`` arguments: tensor parallel, the adapter served with ``enable_lora`` (lm-eval
    turns it on with ``lora_local_path``) or, with ``merged``, a merged copy loaded as plain weights."""
    args: dict[str, Any] = {
        "pretrained": str(merged) if merged else spec.pretrained,
        "tokenizer": spec.tokenizer,
        "dtype": cfg.dtype,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "batch_size": "auto",
        "max_gen_toks": cfg.max_gen_toks,
        "seed": cfg.seed,
    }
    if cfg.max_model_len:
        args["max_model_len"] = cfg.max_model_len
    if spec.revision and not merged:
        args["revision"] = spec.revision
    if spec.adapter is not None and not merged:
        args["lora_local_path"] = str(spec.adapter)
        args["max_lora_rank"] = cfg.max_lora_rank
    return args


def lm_class(backend: str) -> type:
    """The lm-eval model class of ``backend`` with budget forcing mixed in (imports it lazily)."""
    from lorascope.evaluate.forcing import BudgetForcing

    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        return type("ForcedHFLM", (BudgetForcing, HFLM), {})
    try:
        from lm_eval.models.vllm_causallms import VLLM
    except ImportError as e:
        raise LorascopeError(
            f"evaluate.backend vllm needs the vllm package ({e}); install the gpu extra: pip install -e '.[gpu]'"
        ) from None
    return type("ForcedVLLM", (BudgetForcing, VLLM), {})


def merged_copy(spec: ModelSpec, out_dir: Path) -> Path:
    """Write base + adapter merged into plain weights (for servers without LoRA support); reused
    when already there."""
    from lorascope.atomic import atomic_path
    from lorascope.extract.extractor import load_adapter

    if (out_dir / "config.json").is_file():
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert spec.adapter is not None
    model = AutoModelForCausalLM.from_pretrained(spec.pretrained, revision=spec.revision, dtype="auto")
    merged = load_adapter(model, spec.adapter).merge_and_unload()
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(spec.tokenizer, revision=spec.revision).save_pretrained(tmp)
    return out_dir


def build(cfg: EvaluateSection, spec: ModelSpec, merged_dir: Path) -> Any:
    """The ready lm-eval model; an adapter that does not fit the base is a one-line error."""
    import torch

    cls = lm_class(cfg.backend)
    if cfg.backend == "hf":
        args = hf_args(cfg, spec, "cuda" if torch.cuda.is_available() else "cpu")
    else:
        merged = merged_copy(spec, merged_dir) if spec.adapter and cfg.lora_serving == "merged" else None
        args = vllm_args(cfg, spec, merged)
    try:
        lm = cls(**args)
    except (RuntimeError, ValueError, KeyError) as e:
        if spec.adapter is None:
            raise
        detail = " ".join(str(e).split())[:300]
        raise LorascopeError(f"{spec.adapter}: adapter does not match the base model ({detail})") from None
    lm.budget = budget(cfg)
    return lm
