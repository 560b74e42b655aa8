"""Feature sources (what the contexts stage and the dashboard read): which store, how it turns into features.

``lora``: the adapter components of ``data/activations/lora``, signed (each component gives a
positive and a negative feature). ``mlp``: the MLP neurons of ``data/activations/mlp``, signed the same
way (a SiLU-gated neuron ``act_fn(gate) * up`` takes both signs, so it is read like a LoRA direction:
each sign is its own feature). ``sae``: the LoRA store encoded shard by shard with the trained SAE in
``models/sae`` (its inference threshold), one feature per latent; with ``live_only`` only the latents
``models/sae/alive.json`` lists (the paper interprets live latents only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope import paths
from lorascope.errors import LorascopeError
from lorascope.extract.store import Store

Encoder = Callable[[Any], Any]
"""Store activations ``[T, C]`` (float32) -> feature activations ``[T, F]`` (an SAE's encode)."""


@dataclass
class FeatureSource:
    """A store plus the map from its rows to features."""

    name: str
    store: Store
    features: list[str]
    signed: bool
    encode: Encoder | None = None
    """None: the store's columns are the features."""
    inputs: list[Path] = field(default_factory=list)
    """DVC inputs, for lineage and the resume fingerprint."""
    ids: list[int] | None = None
    """The feature id of each entry of ``features`` (an SAE latent's index); None: its position."""
    dead: int = 0
    """Features left out as dead (SAE latents not in ``alive.json``; 0 for the other sources)."""

    def feature_id(self, position: int) -> int:
        """The id of the ``position``-th feature (what the tables' ``feature`` column holds)."""
        return position if self.ids is None else self.ids[position]

    @property
    def signs(self) -> tuple[int, ...]:
        return (1, -1) if self.signed else (1,)


def _store(root: Path, source: str) -> Store:
    path = root / paths.activations(source)
    store = Store.open(path, hint=f"run `lorascope extract --source {source}` first")
    if store.source != source:
        raise LorascopeError(f"{path}/index.json: holds source {store.source!r}, expected {source!r}")
    return store


def open_source(name: str, root: Path, live_only: bool = False, device: Any = "cpu") -> FeatureSource:
    """The feature source ``name`` (lora | mlp | sae) of the workspace at ``root``; ``live_only``: an SAE
    source holds only the live latents (``alive.json``), encoded to just those columns; the SAE encodes
    on ``device`` (activations handed to ``encode`` must be there)."""
    if name in ("lora", "mlp"):
        store = _store(root, name)
        return FeatureSource(name, store, list(store.components), signed=True, inputs=[store.root])
    if name == "sae":
        sae_dir = root / paths.SAE
        from lorascope.sae.load import alive_latents, load_encoder, require

        require(sae_dir)
        store = _store(root, "lora")
        features, encode = load_encoder(sae_dir, store.components, device)
        source = FeatureSource(
            name, store, features, signed=False, encode=encode, inputs=[store.root, sae_dir]
        )
        if live_only:
            import torch

            alive = alive_latents(sae_dir, len(features))
            columns = torch.tensor(alive, dtype=torch.long, device=device)
            full = encode

            def encode_live(acts_TC: torch.Tensor) -> torch.Tensor:
                return full(acts_TC)[:, columns]

            source.features = [features[i] for i in alive]
            source.ids, source.encode, source.dead = alive, encode_live, len(features) - len(alive)
        return source
    raise LorascopeError(f"--source: unknown feature source {name!r} (expected lora, mlp or sae)")
