"""Is the merged fast path still the trained LoRA? Measured, not assumed.

Folding a rank-1 update ``s * B A`` into a bf16 (or fp16) weight rounds it: its entries are often far
below one ulp of the weight's, so the merged model is the base model plus whatever survived the
rounding, and every later layer sees different inputs. Before extraction the same check tokens run
through

1. the unmerged peft model (adapter in float32): ``x . A`` per component and the next-token
   log-probabilities P_lora (the reference);
2. the same model with the adapter disabled: P_base, for the size of the adapter's effect;
3. the merged model with the fast path's pre-hooks: ``x . A`` and P_merged.

Reported: per component the relative error ``||xA_merged - xA_lora|| / ||xA_lora||`` over the check
tokens, and the mean per-token KL(P_lora || P_merged) next to KL(P_lora || P_base). The fast path is
kept when the largest relative error is at most ``extract.merge_max_relative_error`` and
KL(P_lora || P_merged) is at most ``extract.merge_max_kl_fraction`` x KL(P_lora || P_base) (a merge that
rounds the update away loses the adapter's whole effect: a fraction near 1, even when ``x . A`` itself,
dominated by the base model's activations, barely moves); otherwise extraction runs on the unmerged
model (peft's ``lora_A`` outputs, which peft computes in float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorascope.extract.recorder import Recorder, merge_for_recording

LOGIT_CHUNK = 256
"""Positions whose KL is computed at once (bounds memory: chunk x vocab x 8 bytes). The reference
logits of all check tokens are kept in the model's dtype (2048 tokens x 152k vocab x 2 bytes = 0.6 GB
in bf16)."""


@dataclass
class MergeCheck:
    """What to run and what to accept."""

    docs: list[list[int]]
    """Check tokens: the first documents, the last one cut so that the total is the budget."""
    batch_tokens: int
    max_relative_error: float
    max_kl_fraction: float


@dataclass
class MergeReport:
    """The measured drift of the merged path against the unmerged adapter."""

    tokens: int
    dtype: str
    relative_error: dict[str, float] = field(default_factory=dict)
    """Per component name: ``||xA_merged - xA_lora|| / ||xA_lora||``."""
    kl_merged: float = 0.0
    """Mean per-token KL(P_lora || P_merged), nats."""
    kl_base: float = 0.0
    """Mean per-token KL(P_lora || P_base), nats: the adapter's own effect, for scale."""
    passed: bool = True

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_error.values(), default=0.0)

    @property
    def worst_component(self) -> str:
        return max(self.relative_error, key=self.relative_error.__getitem__, default="")

    @property
    def kl_fraction(self) -> float:
        """KL(P_lora || P_merged) / KL(P_lora || P_base): the share of the adapter's effect merging lost."""
        return (
            self.kl_merged / self.kl_base
            if self.kl_base > 0
            else (0.0 if self.kl_merged <= 0 else float("inf"))
        )

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics (``merge_check.*``)."""
        out = {
            "merge_check.tokens": float(self.tokens),
            "merge_check.max_relative_error": self.max_relative_error,
            "merge_check.kl_lora_merged": self.kl_merged,
            "merge_check.kl_lora_base": self.kl_base,
            "merge_check.kl_fraction": min(self.kl_fraction, 1e30),
            "merge_check.passed": float(self.passed),
        }
        out |= {f"merge_check.relative_error.{k}": v for k, v in self.relative_error.items()}
        return out

    def summary(self) -> str:
        verdict = "merged fast path kept" if self.passed else "unmerged model used"
        return (
            f"merge check ({self.dtype}, {self.tokens} tokens): max relative error of x.A "
            f"{self.max_relative_error:.2e} ({self.worst_component}), KL(P_lora||P_merged) {self.kl_merged:.2e} "
            f"= {self.kl_fraction:.2e} x KL(P_lora||P_base) ({self.kl_base:.2e} nats/token): {verdict}"
        )


def check_tokens(docs: list[list[int]], budget: int) -> list[list[int]]:
    """The first documents up to ``budget`` tokens (the last one cut)."""
    out, total = [], 0
    for doc in docs:
        if total >= budget:
            break
        out.append(doc[: budget - total])
        total += len(out[-1])
    return [d for d in out if d]


def _pass(
    causal_lm: Any,
    hooked: Any,
    recorder: Recorder | None,
    method: str,
    check: MergeCheck,
    device: Any,
    reference: list[Any] | None,
) -> tuple[Any, list[Any], float]:
    """One pass over the check tokens: ``(x . A [N, C] float32 or None, logits per batch, KL sum)``;
    with ``reference`` (logits per batch) the KL(reference || this) is summed (in float64) instead."""
    import contextlib

    import torch

    from lorascope.extract.batching import padded_batches

    decoder, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    acts, logits_list, kl = [], [], 0.0
    attach = recorder.attach(hooked, method) if recorder is not None else contextlib.nullcontext()
    with torch.inference_mode(), attach:
        for b, (_batch, input_ids, mask) in enumerate(padded_batches(check.docs, check.batch_tokens)):
            valid = (mask if mask is not None else torch.ones_like(input_ids)).bool().to(device)
            if recorder is not None:
                recorder.begin(input_ids.shape[0], input_ids.shape[1], device)
            hidden = decoder(
                input_ids=input_ids.to(device),
                attention_mask=None if mask is None else mask.to(device),
                use_cache=False,
            ).last_hidden_state[valid]
            if recorder is not None:
                acts.append(recorder.buffer_BSC[valid])
            parts = []
            for lo in range(0, hidden.shape[0], LOGIT_CHUNK):
                logits = head(hidden[lo : lo + LOGIT_CHUNK])
                if reference is None:
                    parts.append(logits)  # kept as computed; the KL is taken in float64
                else:
                    ref = reference[b][lo : lo + LOGIT_CHUNK].double().log_softmax(-1)
                    logq = logits.double().log_softmax(-1)
                    kl += float((ref.exp() * (ref - logq)).sum())
            if reference is None:
                logits_list.append(torch.cat(parts))
    return (torch.cat(acts) if acts else None), logits_list, kl


def measure(
    peft_model: Any, recorder_lora: Recorder, check: MergeCheck, device: Any
) -> tuple[Any, MergeReport, Any]:
    """Run the check on ``peft_model`` (unmerged, then merged in place). Returns ``(merged model,
    report, its pre-hook Recorder)``; the caller reloads the unmerged model when the check fails."""
    import torch

    from lorascope.components import feature_names
    from lorascope.devices import dtype_name

    base = peft_model.get_base_model()
    components = recorder_lora.components
    acts_lora, logp_lora, _ = _pass(base, peft_model, recorder_lora, "lora_a", check, device, None)
    with peft_model.disable_adapter():
        _, _, kl_base = _pass(base, peft_model, None, "lora_a", check, device, logp_lora)
    merged, recorder = merge_for_recording(peft_model, components)
    acts_merged, _, kl_merged = _pass(merged, merged, recorder, "merged", check, device, logp_lora)
    del logp_lora
    tokens = acts_lora.shape[0]
    diff = (acts_merged - acts_lora).norm(dim=0)
    rel = diff / acts_lora.norm(dim=0).clamp(min=torch.finfo(torch.float32).tiny)
    report = MergeReport(
        tokens=tokens,
        dtype=dtype_name(next(merged.parameters()).dtype),
        relative_error=dict(zip(feature_names(components), rel.tolist(), strict=True)),
        kl_merged=kl_merged / tokens,
        kl_base=kl_base / tokens,
    )
    report.passed = (
        report.max_relative_error <= check.max_relative_error
        and report.kl_merged <= check.max_kl_fraction * max(report.kl_base, 0.0)
    )
    return merged, report, recorder
