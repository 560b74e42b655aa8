"""Build the lm-eval model for one variant: ``hf`` (HFLM, ``peft=`` for adapters) or ``vllm``.

Both get the budget-forcing mixin (``forcing.py``). vLLM is imported only when that backend is
built; its arguments are built by a plain function so they are tested without it.

Before anything is generated, an adapter variant must change the model: on a probe prompt its
log-probs, as the engine that will generate computes them, must differ from the base model's (the
known failure being an engine that silently ignores a LoRA, or a merge that rounds a rank-1 update
away). A merged copy is checked when it is made: the merged weights against the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorascope.chat import ANSWER, THINK, chat_template
from lorascope.errors import LorascopeError
from lorascope.evaluate.forcing import Budget
from lorascope.evaluate.params import EvaluateSection
from lorascope.models import ADAPTER_CONFIG, MODEL_CONFIG

PROBE_USER = "What is 7 + 5? Put the result in a box."
"""The probe prompt's user turn (its continuation is a short think/answer reply)."""
PROBE_REPLY = THINK + "\n7 plus 5: 7 + 3 = 10, and 2 more is 12.\n" + ANSWER + "\nAnswer: \\boxed{12}"
PROBE_ATOL = 1e-5
"""Largest log-prob difference on the probe still read as "the adapter changes nothing"."""
PROBE_FILE = "probe.json"
"""Written into a merged copy: how far its probe log-probs are from the base's."""


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
    from lorascope.models import source

    base, base_rev = source(base_dir)
    if (model_dir / ADAPTER_CONFIG).is_file():
        return ModelSpec(base, base_rev, base, model_dir)
    if model_dir.resolve() == base_dir.resolve():
        return ModelSpec(base, base_rev, base, None)
    if (model_dir / MODEL_CONFIG).is_file():
        return ModelSpec(str(model_dir), None, base, None)
    raise LorascopeError(
        f"{model_dir}: not a model (expected {ADAPTER_CONFIG} or {MODEL_CONFIG}); "
        "run the stage that writes it (e.g. `lorascope finetune`) first"
    )


def budget(cfg: EvaluateSection, format: str = "think") -> Budget:
    """How the variant's questions are generated (``format``: the variant's prompt format)."""
    return Budget(
        max_gen_toks=cfg.max_gen_toks,
        thinking_tokens=cfg.thinking_tokens,
        answer_tokens=cfg.answer_tokens,
        wait_extensions=cfg.wait_extensions,
        wait_text=cfg.wait_text,
        chunk_size=cfg.chunk_size,
        format=format,  # type: ignore[arg-type]
        temperature=cfg.temperature,
        seed=cfg.seed,
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


def _decode_with_specials(self: Any, tokens: Any, skip_special_tokens: bool = False) -> str:
    """HFLM's ``tok_decode`` keeping special tokens by default, as lm-eval's vLLM model decodes: the
    stop sequences (``<|im_start|>`` ends a thinking phase) are cut from the decoded text, so with
    specials skipped a batch-mate's longer generation left the text after the stop in the output."""
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)


def lm_class(backend: str) -> type:
    """The lm-eval model class of ``backend`` with budget forcing mixed in (imports it lazily)."""
    from lorascope.evaluate.forcing import BudgetForcing

    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        # decode as vLLM (s1's engine) does: no repetition penalty or top-k/top-p from the
        # checkpoint's generation config (Qwen2.5-Instruct ships both)
        neutral = {"extra_kwargs": {"repetition_penalty": 1.0}, "sampling_kwargs": {"top_p": 1.0, "top_k": 0}}
        return type("ForcedHFLM", (BudgetForcing, HFLM), {**neutral, "tok_decode": _decode_with_specials})
    try:
        from lm_eval.models.vllm_causallms import VLLM
    except ImportError as e:
        raise LorascopeError(
            f"evaluate.backend vllm needs the vllm package ({e}); install the gpu extra: pip install -e '.[gpu]'"
        ) from None
    return type("ForcedVLLM", (BudgetForcing, VLLM), {"seed_in_kwargs": True})


def _probe_ids(tokenizer: Any) -> list[int]:
    return tokenizer(chat_template(tokenizer, PROBE_USER) + PROBE_REPLY, add_special_tokens=False).input_ids


def _logprobs(model: Any, ids: list[int]) -> Any:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return model(torch.tensor([ids], device=device)).logits.float().log_softmax(-1)


def not_applied(where: Any, diff: float) -> LorascopeError:
    return LorascopeError(
        f"{where}: the adapter does not change the model: on the probe prompt its log-probs equal the base "
        f"model's (max difference {diff:.3g} <= {PROBE_ATOL:g}); the engine ignored it or its lora_B is zero"
    )


def merged_copy(spec: ModelSpec, out_dir: Path, dtype: str = "auto") -> Path:
    """Write base + adapter merged into plain weights in ``dtype`` (for servers without LoRA
    support); reused when already there. The merged model must differ from the base on the probe
    prompt (a rank-1 update can round away in a low-precision merge): otherwise nothing is written
    and the error says so; the difference found is kept in ``probe.json``."""
    import json

    from lorascope.atomic import atomic_path
    from lorascope.models import load_merged, pretrained_model, pretrained_tokenizer, save_tokenizer

    if (out_dir / MODEL_CONFIG).is_file() and (out_dir / PROBE_FILE).is_file():
        return out_dir
    assert spec.adapter is not None
    tokenizer = pretrained_tokenizer(spec.tokenizer, spec.revision)
    model = pretrained_model(spec.pretrained, spec.revision, dtype=dtype)
    ids = _probe_ids(tokenizer)
    base = _logprobs(model, ids)
    merged = load_merged(model, spec.adapter)
    diff = float((_logprobs(merged, ids) - base).abs().max())
    if not diff > PROBE_ATOL:
        raise not_applied(f"{spec.adapter} (merged in {dtype})", diff)
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        (tmp / PROBE_FILE).write_text(json.dumps({"max_logprob_diff_vs_base": diff, "dtype": dtype}) + "\n")
    return out_dir


def adapter_effect(lm: Any, cfg: EvaluateSection) -> float:
    """How far the served adapter moves the model on the probe prompt: the largest log-prob
    difference from the base model, both computed by ``lm``'s own engine (hf: the peft model with
    its adapter on and off; vllm: the probe's log-likelihood with and without the LoRA request)."""
    if cfg.backend == "hf":
        model = lm.model
        ids = _probe_ids(lm.tokenizer)
        with model.disable_adapter():
            base = _logprobs(model, ids)
        return float((_logprobs(model, ids) - base).abs().max())
    from lm_eval.api.instance import Instance

    request = Instance("loglikelihood", {}, (chat_template(lm.tokenizer, PROBE_USER), PROBE_REPLY), 0)
    served = lm.loglikelihood([request], disable_tqdm=True)[0][0]
    lora, lm.lora_request = lm.lora_request, None
    try:
        base = lm.loglikelihood([request], disable_tqdm=True)[0][0]
    finally:
        lm.lora_request = lora
    return abs(served - base)


def check_adapter_applied(lm: Any, cfg: EvaluateSection, spec: ModelSpec) -> float | None:
    """Stop with a one-line error when an adapter variant's engine computes the base model's
    log-probs on the probe; returns the difference (None: no adapter is served by the engine)."""
    if spec.adapter is None or (cfg.backend == "vllm" and cfg.lora_serving == "merged"):
        return None  # a merged copy was checked when it was made
    diff = adapter_effect(lm, cfg)
    if not diff > PROBE_ATOL:
        raise not_applied(spec.adapter, diff)
    return diff


def build(cfg: EvaluateSection, spec: ModelSpec, merged_dir: Path, format: str = "think") -> Any:
    """The ready lm-eval model for a variant prompted in ``format``; an adapter that does not fit the
    base, or that the engine does not apply, is a one-line error."""
    from lorascope.devices import resolve

    cls = lm_class(cfg.backend)
    if cfg.backend == "hf":
        device, _ = resolve("auto", None, "evaluate")  # the GPU when there is one (the dtype: cfg.dtype)
        args = hf_args(cfg, spec, str(device))
    else:
        merged = None
        if spec.adapter and cfg.lora_serving == "merged":
            merged = merged_copy(spec, merged_dir, cfg.dtype)
        args = vllm_args(cfg, spec, merged)
    try:
        lm = cls(**args)
    except (RuntimeError, ValueError, KeyError) as e:
        if spec.adapter is None:
            raise
        detail = " ".join(str(e).split())[:300]
        raise LorascopeError(f"{spec.adapter}: adapter does not match the base model ({detail})") from None
    lm.budget = budget(cfg, format)
    check_adapter_applied(lm, cfg, spec)
    return lm
