"""Ablated adapters as real peft directories (Table 2): the saved adapter without the selected
components' weights, and a config that targets only what is left, so peft, lm-eval and vLLM load
it like any adapter.

When what is left is every component of some types (``--group attn`` leaves gate, up, down), the
config lists those types, as peft writes it; otherwise it names the remaining modules exactly with
a regular expression (peft full-matches a string ``target_modules``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lorascope import paths
from lorascope.ablate.targets import select_all
from lorascope.atomic import atomic_path, write_json
from lorascope.components import Component, component_key, layer_of
from lorascope.config import Params
from lorascope.errors import LorascopeError
from lorascope.models import ADAPTER_CONFIG as CONFIG
from lorascope.models import ADAPTER_WEIGHTS as WEIGHTS
from lorascope.project import workspace_root
from lorascope.sections import LORA_TARGETS

_PREFIX = "base_model.model."
_SUFFIX = re.compile(r"\.lora_[AB]\.weight$")
ADAPTER = paths.LORA
REMOVED = "ablation.json"
"""What was removed: the selectors and the component names."""


def saved_components(tensors: dict[str, Any]) -> list[Component]:
    """The components of a saved adapter, from its weight names, in component order."""
    found = {}
    for key, value in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = _SUFFIX.sub("", key).removeprefix(_PREFIX)
            kind = module.rsplit(".", 1)[-1]
            if kind not in LORA_TARGETS:
                raise LorascopeError(f"adapter targets {module!r}; expected only {', '.join(LORA_TARGETS)}")
            found[module] = Component(layer_of(module), kind, module, int(value.shape[0]))
    if not found:
        raise LorascopeError("the adapter has no LoRA weights")
    return sorted(found.values(), key=lambda c: (c.layer, LORA_TARGETS.index(c.kind)))


def _targets(kept: list[Component], every: list[Component]) -> tuple[Any, bool]:
    """``(target_modules, keeps the layer selection)`` for the kept components."""
    kinds = sorted({c.kind for c in kept}, key=LORA_TARGETS.index)
    whole_types = {(c.layer, c.kind) for c in every if c.kind in kinds} == {(c.layer, c.kind) for c in kept}
    if whole_types:
        return kinds, True
    return "^(?:" + "|".join(re.escape(c.module) for c in kept) + ")$", False


def export(
    adapter_dir: Path,
    output: Path,
    selectors: list[str],
    where: str,
) -> list[str]:
    """Write ``adapter_dir`` without the components named by ``selectors`` to ``output``; returns the
    removed component names, also written to ``ablation.json`` beside the adapter. Errors name
    ``where`` (the option or params key)."""
    from safetensors.torch import load_file, save_file

    if not (adapter_dir / CONFIG).is_file() or not (adapter_dir / WEIGHTS).is_file():
        raise LorascopeError(
            f"{adapter_dir}: no saved LoRA adapter ({CONFIG} and {WEIGHTS}); run `lorascope finetune --variant lora`"
        )
    tensors = load_file(str(adapter_dir / WEIGHTS))
    comps = saved_components(tensors)
    removed = [comps[i] for i in select_all(selectors, comps, where)]
    gone = {c.module for c in removed}
    kept = [c for c in comps if c.module not in gone]
    if not kept:
        raise LorascopeError(
            f"{where}: {' '.join(selectors)!r} removes every component; evaluate the base model instead"
        )
    config = json.loads((adapter_dir / CONFIG).read_text())
    config["target_modules"], keep_layers = _targets(kept, comps)
    if not keep_layers:
        config["layers_to_transform"], config["layers_pattern"] = None, None
    names = [component_key(c.layer, c.kind) for c in removed]
    keep = {k: v for k, v in tensors.items() if _SUFFIX.sub("", k).removeprefix(_PREFIX) not in gone}
    with atomic_path(output) as tmp:
        tmp.mkdir(parents=True)
        save_file(keep, str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / CONFIG, config)
        write_json(tmp / REMOVED, {"selectors": selectors, "removed": names})
    return names


def export_dir(group: str) -> Path:
    """Where ``ablate export --group <group>`` writes: ``models/lora-<group>-ablated``."""
    return workspace_root() / paths.ablated_adapter(group)


def run_export(params: Params, group: str) -> Path:
    """``models/lora-<group>-ablated``: the adapter without the components ``group`` selects."""
    import mlflow
    from safetensors.torch import load_file

    from lorascope.tracking import stage_run

    root = workspace_root()
    adapter_dir = root / ADAPTER
    if (adapter_dir / WEIGHTS).is_file():  # bad selectors fail before a run is opened
        select_all([group], saved_components(load_file(str(adapter_dir / WEIGHTS))), "--group")
    out = export_dir(group)
    with stage_run(
        "ablate", params, [adapter_dir], run_name=f"export-{group}", tags={"ablate.export": group}
    ) as sr:
        removed = export(adapter_dir, out, [group], "--group")
        mlflow.log_params({"export.group": group, "export.removed": len(removed)})
        mlflow.log_dict({"group": group, "removed": removed}, "export.json")
        sr.log_outputs(out)
    return out
