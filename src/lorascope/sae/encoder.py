"""The trained SAE as an encoder for later stages (contexts ``--source sae``, ablation, steering)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorascope.errors import LorascopeError


def load_encoder(
    sae_dir: Path, components: list[str], device: Any = "cpu"
) -> tuple[list[str], Callable[[torch.Tensor], torch.Tensor]]:
    """Latent names and ``encode(acts_TC) -> latents_TF`` (calibrated threshold; the SAE on ``device``,
    ``acts_TC`` expected there) for a store whose columns are ``components``; a store of other
    components is a one-line error."""
    from lorascope.sae.load import load_sae

    sae, cfg = load_sae(sae_dir, device)
    if cfg["components"] != components:
        raise LorascopeError(
            f"{sae_dir}/cfg.json: the SAE was trained on {cfg['d_in']} components that differ from the store's "
            f"{len(components)} (retrain it with `lorascope sae`)"
        )
    sae.eval()

    @torch.no_grad()
    def encode(acts_TC: torch.Tensor) -> torch.Tensor:
        return sae.encode(acts_TC)

    from lorascope.components import latent_name

    return [latent_name(i) for i in range(sae.d_sae)], encode
