"""The metadata keys of the contexts stage's features table (``<source>.features.parquet``), for its readers
in other stages: a module without torch, so reading them costs no heavy import."""

from __future__ import annotations

LATENTS_KEY = b"lorascope.latents"
"""Features-table metadata of an SAE source: JSON ``{"d_sae", "alive", "dead"}`` (live latents kept)."""
EXCLUDED_KEY = b"lorascope.excluded"
"""Features-table metadata: JSON ``{"excluded", "first_position", "special_tokens", "norm"}``, the
store's tokens the ``contexts.exclude`` policy left out (in all, and per reason; reasons may overlap)."""
