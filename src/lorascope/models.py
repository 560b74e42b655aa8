"""Loading what the stages wrote: the base model and its tokenizer, the LoRA adapter on it (unmerged
or merged), with the compute device and dtype resolved in one place (``lorascope.devices.resolve``).
The only module that calls ``from_pretrained`` (a test checks it). The SAE loads from
``lorascope.sae.load``: a stage that loads a model then does not depend on the SAE's code.

The base is what the ``base`` stage wrote (a tiny model directory or a ``reference.json`` to a real
one); every stage that runs a model loads it through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorascope.errors import LorascopeError

MODEL_CONFIG = "config.json"
"""A Hugging Face model directory's config (the tiny base, a full finetune, a merged copy)."""
REFERENCE = "reference.json"
"""The ``base`` stage's pin of a real base model (hub id or local path, revision), never copied."""
ADAPTER_CONFIG = "adapter_config.json"
"""A peft adapter directory's config (the LoRA, the ablated adapters)."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""A peft adapter directory's weights."""


# ------------------------------------------------------------------------------------------ base
def source(base_dir: str | Path) -> tuple[str, str | None]:
    """``(name_or_path, revision)`` to pass to ``from_pretrained``."""
    base_dir = Path(base_dir)
    ref = base_dir / REFERENCE
    if ref.is_file():
        data = json.loads(ref.read_text())
        return data["model"], data["revision"] if data.get("kind") == "hub" else None
    if (base_dir / MODEL_CONFIG).is_file():
        return str(base_dir), None
    raise LorascopeError(
        f"{base_dir}: no base model here (expected {MODEL_CONFIG} or {REFERENCE}); run `lorascope base`"
    )


def model_name(base_dir: str | Path) -> str:
    """How adapters and runs name the base: the hub id, or a path relative to the workspace root
    when the model lives inside it (so outputs do not embed this machine's absolute paths)."""
    from lorascope.project import workspace_root

    name, _ = source(base_dir)
    path, root = Path(name), workspace_root()
    if path.is_absolute() and path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    return name


def pretrained_tokenizer(name: str, revision: str | None) -> Any:
    """The tokenizer of hub id or directory ``name`` at ``revision``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, revision=revision)


def pretrained_model(name: str, revision: str | None, **kwargs: Any) -> Any:
    """The causal LM of hub id or directory ``name`` at ``revision``; ``kwargs`` go to
    ``from_pretrained`` (dtype, device_map, ...)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, revision=revision, **kwargs)


def pretrained_config(name: str, revision: str | None) -> Any:
    """The model config of hub id or directory ``name`` at ``revision`` (no weights loaded)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, revision=revision)


def load_tokenizer(base_dir: str | Path) -> Any:
    """The base model's tokenizer (with its chat template)."""
    return pretrained_tokenizer(*source(base_dir))


LOAD_OPTIONS = ("local_files_only",)
"""tokenizer_config.json keys transformers records from how a tokenizer was loaded (``local_files_only``
follows ``HF_HUB_OFFLINE``), not from what it is: dropped when saving, so a stage output does not depend on
the environment it ran in."""


def save_tokenizer(tokenizer: Any, out: str | Path) -> None:
    """``tokenizer.save_pretrained(out)`` without the ``LOAD_OPTIONS`` keys."""
    tokenizer.save_pretrained(str(out))
    path = Path(out) / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        if any(k in config for k in LOAD_OPTIONS):
            path.write_text(
                json.dumps(
                    {k: v for k, v in config.items() if k not in LOAD_OPTIONS}, indent=2, ensure_ascii=False
                )
                + "\n"
            )


def load_model(base_dir: str | Path, **kwargs: Any) -> Any:
    """The base causal LM; ``kwargs`` go to ``from_pretrained`` (dtype, device_map, ...)."""
    name, revision = source(base_dir)
    return pretrained_model(name, revision, **kwargs)


# ------------------------------------------------------------------------------------------ adapter
def check_adapter_base(adapter_dir: Path, base_dir: Path) -> None:
    config = adapter_dir / ADAPTER_CONFIG
    if not config.is_file():
        raise LorascopeError(
            f"{adapter_dir}: no LoRA adapter ({ADAPTER_CONFIG} missing); run `lorascope finetune --variant lora`"
        )
    trained_on = json.loads(config.read_text()).get("base_model_name_or_path")
    base = model_name(base_dir)
    if trained_on and trained_on != base:
        raise LorascopeError(
            f"{adapter_dir}: adapter was trained on {trained_on!r}, but the base model is {base!r}"
        )


def load_lora_model(
    base_dir: Path, adapter_dir: Path, precision: str, device: str = "auto", section: str = "model"
) -> Any:
    """The base model in ``<section>.precision`` on ``<section>.device`` (``lorascope.devices``),
    wrapped with the saved adapter (unmerged, eval mode, ``lora_A``/``lora_B`` in float32): what the
    ablate and steer stages hook."""
    from lorascope.devices import resolve

    check_adapter_base(adapter_dir, base_dir)
    dev, dtype = resolve(device, precision, section)
    model = load_model(base_dir, dtype=dtype).to(dev)
    return load_adapter(model, adapter_dir).eval()


def load_adapter(model: Any, adapter_dir: Path) -> Any:
    """Wrap ``model`` with the saved adapter; a mismatch (targets, shapes) is a one-line error. The
    adapter's weights are float32 whatever the model's dtype (peft's default, made explicit): a
    rank-1 update is far below a bf16 ulp of the weights it adapts, and ``x . A`` is read in fp32."""
    import torch
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        detail = " ".join(str(e).split())[:300]
        raise LorascopeError(f"{adapter_dir}: adapter does not match the base model ({detail})") from None
    for name, param in peft_model.named_parameters():
        if ".lora_" in name and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


def load_merged(model: Any, adapter_dir: Path) -> Any:
    """``model`` with the saved adapter merged into its weights (plain weights, no peft wrapper)."""
    return load_adapter(model, adapter_dir).merge_and_unload()
