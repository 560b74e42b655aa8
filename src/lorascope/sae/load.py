"""The files the ``sae`` stage writes in ``models/sae/`` and their one reader and writer: the weights
(raw input space), the cfg and the live latents. Every other stage reads them through this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorascope.components import latent_name
from lorascope.errors import LorascopeError
from lorascope.sae.model import BatchTopKSAE

CFG = "cfg.json"
"""The SAE's shape, the components it reads (in order), its threshold and input scale."""
WEIGHTS = "sae.safetensors"
"""``W_enc_DF``, ``b_enc_F``, ``W_dec_FD``, ``b_dec_D``, ``threshold`` in raw ``x . A`` units."""
ALIVE = "alive.json"
"""``{"alive_latents": [...], "d_sae": n}``: the latents every later stage interprets."""


def require(directory: Path) -> None:
    """A one-line error unless ``directory`` holds a trained SAE."""
    for name in (CFG, WEIGHTS):
        if not (directory / name).is_file():
            raise LorascopeError(f"{directory}: no trained SAE ({name} missing); run `lorascope sae` first")


def read_cfg(directory: Path) -> dict[str, Any]:
    """The SAE's cfg (a one-line error when there is no trained SAE)."""
    require(directory)
    cfg: dict[str, Any] = json.loads((directory / CFG).read_text())
    return cfg


def load_sae(directory: Path, device: Any = "cpu") -> tuple[BatchTopKSAE, dict[str, Any]]:
    """The saved SAE (raw input space, on ``device``) and its cfg."""
    from safetensors.torch import load_file

    cfg = read_cfg(directory)
    sae = BatchTopKSAE(cfg["d_in"], cfg["d_sae"], cfg["k"])
    sae.load_state_dict(load_file(str(directory / WEIGHTS)))
    return sae.to(device), cfg


def save(sae: BatchTopKSAE, directory: Path, cfg: dict[str, Any]) -> None:
    """The weights and the cfg (the DESIGN checkpoint contract)."""
    from safetensors.torch import save_file

    from lorascope.atomic import write_json

    save_file(
        {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}, str(directory / WEIGHTS)
    )
    write_json(directory / CFG, cfg)


def write_alive(directory: Path, alive: list[int], d_sae: int) -> None:
    """The live latents, as ``alive_latents`` reads them."""
    from lorascope.atomic import write_json

    write_json(directory / ALIVE, {"alive_latents": alive, "d_sae": d_sae})


def alive_latents(directory: Path, d_sae: int | None = None) -> list[int]:
    """The live latents ``alive.json`` lists (sorted); a missing or malformed file is a one-line error.
    ``d_sae``: the SAE's width, checked against the file's."""
    path = directory / ALIVE
    if not path.is_file():
        raise LorascopeError(f"{path}: not found (the live latents); re-run `lorascope sae`")
    try:
        doc = json.loads(path.read_text())
        alive = sorted({int(i) for i in doc["alive_latents"]})
        width = int(doc["d_sae"])
    except (ValueError, KeyError, TypeError) as err:
        raise LorascopeError(
            f"{path}: unreadable ({type(err).__name__}: {err}); re-run `lorascope sae`"
        ) from None
    if (d_sae is not None and width != d_sae) or any(not 0 <= i < width for i in alive):
        raise LorascopeError(f"{path}: does not match the SAE's {d_sae} latents; re-run `lorascope sae`")
    return alive


def load_encoder(
    sae_dir: Path, components: list[str], device: Any = "cpu"
) -> tuple[list[str], Callable[[torch.Tensor], torch.Tensor]]:
    """Latent names and ``encode(acts_TC) -> latents_TF`` (calibrated threshold; the SAE on ``device``,
    ``acts_TC`` expected there) for a store whose columns are ``components``; a store of other
    components is a one-line error."""
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

    return [latent_name(i) for i in range(sae.d_sae)], encode
