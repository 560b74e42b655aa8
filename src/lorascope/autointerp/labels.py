"""The label table ``data/interp/<source>.parquet`` that ``autointerp`` writes and ``categorize``, ``steer``
and ``report`` read."""

LABEL_COLUMNS = (
    "source", "feature", "feature_name", "sign", "layer", "component", "explanation", "classification",
    "class_reasoning", "status", "error", "raw_response", "backend", "model", "prompt_hash", "input_tokens",
    "output_tokens", "cost_usd", "cached", "detection_balanced_accuracy", "detection_n",
)  # fmt: skip
"""Columns of ``data/interp/<source>.parquet`` (one row per feature; ``status`` ok | failed)."""
