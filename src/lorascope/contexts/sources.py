"""Feature sources for the contexts stage: which store to read, how to turn it into features.

``lora``: the adapter components of ``data/activations/lora``, signed (each component gives a
positive and a negative feature). ``mlp``: the MLP neurons of ``data/activations/mlp``. ``sae``: the
LoRA store encoded shard by shard with the trained SAE in ``models/sae`` (its inference threshold),
one feature per latent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorascope.contexts.selection import Encoder
from lorascope.errors import LorascopeError
from lorascope.extract.store import Store

SAE_DIR = Path("models/sae")


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

    @property
    def signs(self) -> tuple[int, ...]:
        return (1, -1) if self.signed else (1,)


def _store(root: Path, source: str) -> Store:
    path = root / "data" / "activations" / source
    store = Store.open(path, hint=f"run `lorascope extract --source {source}` first")
    if store.source != source:
        raise LorascopeError(f"{path}/index.json: holds source {store.source!r}, expected {source!r}")
    return store


def open_source(name: str, root: Path) -> FeatureSource:
    """The feature source ``name`` (lora | mlp | sae) of the workspace at ``root``."""
    if name in ("lora", "mlp"):
        store = _store(root, name)
        return FeatureSource(name, store, list(store.components), signed=name == "lora", inputs=[store.root])
    if name == "sae":
        sae_dir = root / SAE_DIR
        if not (sae_dir / "cfg.json").is_file():
            raise LorascopeError(f"{sae_dir}: no trained SAE (cfg.json missing); run `lorascope sae` first")
        from lorascope.sae.encoder import load_encoder

        store = _store(root, "lora")
        features, encode = load_encoder(sae_dir, store.components)
        return FeatureSource(name, store, features, signed=False, encode=encode, inputs=[store.root, sae_dir])
    raise LorascopeError(f"--source: unknown feature source {name!r} (expected lora, mlp or sae)")
