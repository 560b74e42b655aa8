"""Load the model for a source and turn documents into an activation matrix, batch by batch."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorascope.errors import LorascopeError
from lorascope.extract.components import Component, feature_names, lora_components, mlp_components
from lorascope.extract.merge_check import MergeCheck, MergeReport
from lorascope.extract.recorder import Recorder


def compute_dtype(precision: str, device: Any = None, key: str = "extract.precision") -> Any:
    """The model dtype for ``precision`` on ``device`` (default: the GPU when there is one), resolved
    by ``lorascope.devices`` (an unsupported dtype is a one-line error naming ``key``)."""
    import torch

    from lorascope.devices import resolve_dtype

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_dtype(precision, device, key)


def pack_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group document indices, longest first, so that batch size x longest length <= batch_tokens
    (a document longer than the budget forms a batch alone). Sorting keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def padded_batches(docs: list[list[int]], batch_tokens: int) -> Iterator[tuple[list[int], Any, Any]]:
    """``(document indices, input_ids, attention_mask or None)`` per packed batch: right padding,
    a mask only when the batch holds several documents (one document needs none)."""
    import torch

    lengths = [len(d) for d in docs]
    for batch in pack_batches(lengths, batch_tokens):
        width = lengths[batch[0]]
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : lengths[i]] = torch.as_tensor(docs[i])
            mask[row, : lengths[i]] = 1
        yield batch, input_ids, mask if len(batch) > 1 else None


def check_adapter_base(adapter_dir: Path, base_dir: Path) -> None:
    from lorascope.base.load import model_name

    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise LorascopeError(
            f"{adapter_dir}: no LoRA adapter (adapter_config.json missing); run `lorascope finetune --variant lora`"
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
    from lorascope.base.load import load_model
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


@dataclass
class Extractor:
    """A model ready to record: its decoder stack, the recorder and the hook method."""

    model: Any
    recorder: Recorder
    method: str
    """What the recorder reads: ``merged`` (the fast path), ``lora_a`` (unmerged) or ``mlp``."""
    device: Any
    merge_report: MergeReport | None = None
    """The merge check's measurements, when the merged path was requested and checked."""

    @property
    def components(self) -> list[Component]:
        return self.recorder.components

    @property
    def names(self) -> list[str]:
        return feature_names(self.components)

    @classmethod
    def load(
        cls,
        source: str,
        method: str,
        base_dir: Path,
        adapter_dir: Path | None,
        precision: str,
        device: Any,
        neurons: int,
        check: MergeCheck | None = None,
    ) -> Extractor:
        """``source`` ``lora`` (base + adapter, ``method`` merged | lora_a) or ``mlp`` (base only).

        ``merged`` with a ``check``: the merged model is measured against the unmerged adapter on the
        check tokens (``merge_check``) and kept only within the tolerances, else the unmerged model
        is reloaded and read through ``lora_A`` (``method`` becomes ``lora_a``)."""
        from lorascope.base.load import load_model

        dtype = compute_dtype(precision, device)

        def unmerged() -> Any:
            assert adapter_dir is not None  # only the lora source has an adapter
            model = load_model(base_dir, dtype=dtype).to(device).eval()
            return load_adapter(model, adapter_dir).eval()

        if source == "mlp":
            model = load_model(base_dir, dtype=dtype).to(device).eval()
            return cls(model, Recorder(mlp_components(model, neurons)), "mlp", device)
        assert adapter_dir is not None
        check_adapter_base(adapter_dir, base_dir)
        peft_model = unmerged()
        components = lora_components(peft_model)
        if method == "lora_a":
            return cls(peft_model, Recorder(components), method, device)
        if check is not None and check.docs:
            from lorascope.extract.merge_check import measure

            merged, report, recorder = measure(peft_model, Recorder(components), check, device)
            if report.passed:
                return cls(merged, recorder, "merged", device, report)
            del merged, peft_model
            return cls(unmerged(), Recorder(components), "lora_a", device, report)
        base = peft_model.get_base_model()
        projections = {
            c.module: base.get_submodule(c.module).lora_A["default"].weight.detach().float().clone()
            for c in components
        }
        merged = peft_model.merge_and_unload()
        return cls(merged, Recorder(components, projections), method, device)

    def decoder(self) -> Any:
        """The transformer stack without the LM head (logits are not needed to record inputs)."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.get_decoder()

    def run(self, docs: list[list[int]], batch_tokens: int, store_dtype: str) -> tuple[Any, Any]:
        """``(acts_TC, token_ids_T)`` for ``docs`` concatenated in order, on the CPU."""
        import torch

        lengths = [len(d) for d in docs]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        acts_TC = torch.empty(offsets[-1], self.recorder.width, dtype=getattr(torch, store_dtype))
        ids_T = torch.tensor([t for d in docs for t in d], dtype=torch.int32)
        decoder = self.decoder()
        with torch.inference_mode(), self.recorder.attach(self.model, self.method):
            for batch, input_ids, mask in padded_batches(docs, batch_tokens):
                self.recorder.begin(len(batch), input_ids.shape[1], self.device)
                decoder(
                    input_ids=input_ids.to(self.device),
                    attention_mask=None if mask is None else mask.to(self.device),
                    use_cache=False,
                )
                values_BSC = self.recorder.buffer_BSC.to(acts_TC.dtype).cpu()
                for row, i in enumerate(batch):
                    acts_TC[offsets[i] : offsets[i + 1]] = values_BSC[row, : lengths[i]]
        return acts_TC, ids_T
