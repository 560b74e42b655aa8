"""``extract`` params, and the outlier-token exclusion policy that ``contexts`` and ``sae`` share."""

from __future__ import annotations

from typing import Literal

from lorascope.sections import PositiveFloat, PositiveInt, Precision, Section

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
