"""Load the model for a source and turn documents into an activation matrix, batch by batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorascope.components import Component, feature_names, lora_components, mlp_components
from lorascope.extract.batching import padded_batches
from lorascope.extract.merge_check import MergeCheck, MergeReport
from lorascope.extract.recorder import Recorder, merge_for_recording


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
        from lorascope.devices import resolve
        from lorascope.models import check_adapter_base, load_adapter, load_model

        _, dtype = resolve(device, precision, "extract")

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
        merged, recorder = merge_for_recording(peft_model, components)
        return cls(merged, recorder, method, device)

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
