"""The LoRA adapter from params: a peft ``LoraConfig`` checked against the model it will wrap."""

from __future__ import annotations

from typing import Any

from lorascope.errors import LorascopeError
from lorascope.finetune.params import LoraAdapter


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the model's ``nn.Linear`` modules inside its decoder layers (q_proj, ...)."""
    import torch

    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in name
        }
    )


def lora_config(cfg: LoraAdapter, model: Any) -> Any:
    """A ``LoraConfig`` for ``model``; unknown targets or layers are one-line errors."""
    from peft import LoraConfig

    available = linear_module_names(model)
    missing = [t for t in cfg.target_modules if t not in available]
    if missing:
        raise LorascopeError(
            f"finetune.lora.target_modules: the model has no {', '.join(missing)} "
            f"(its linear modules: {', '.join(available)})"
        )
    n_layers = model.config.num_hidden_layers
    if cfg.layers is not None and (bad := [i for i in cfg.layers if i >= n_layers]):
        raise LorascopeError(
            f"finetune.lora.layers: the model has {n_layers} layers (0..{n_layers - 1}), got {bad}"
        )
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; a float works (alpha / r)
        use_rslora=cfg.use_rslora,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=list(cfg.layers) if cfg.layers is not None else None,
        layers_pattern="layers" if cfg.layers is not None else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def adapted_modules(model: Any) -> list[str]:
    """Names of the modules that carry a LoRA adapter, in model order."""
    from peft.tuners.lora import LoraLayer

    return [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
