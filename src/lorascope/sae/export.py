"""Export the trained SAE for other tools.

``saelens``: a directory that ``sae_lens.SAE.load_from_disk`` loads as a JumpReLU SAE (the inference
form of a BatchTopK SAE): ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc``, ``W_dec``,
``b_enc``, ``b_dec`` and a per-latent ``threshold`` (our calibrated threshold for every latent). The
scale is already folded into the weights, so SAELens needs no activation normalisation. Written
here without importing sae_lens (it is not a dependency); the tests load it with the real package.
"""

from __future__ import annotations

from pathlib import Path

from lorascope.atomic import atomic_path, write_json
from lorascope.errors import LorascopeError

FORMATS = ("saelens",)


def export(sae_dir: Path, output: Path, fmt: str = "saelens") -> Path:
    """Write ``sae_dir`` (a ``models/sae`` checkpoint) to ``output`` in ``fmt``."""
    from safetensors.torch import save_file

    from lorascope.sae.load import load_sae

    if fmt not in FORMATS:
        raise LorascopeError(
            f"--format: unknown export format {fmt!r} (expected one of: {', '.join(FORMATS)})"
        )
    if not (sae_dir / "cfg.json").is_file():
        raise LorascopeError(f"{sae_dir}: no trained SAE (cfg.json missing); run `lorascope sae` first")
    sae, cfg = load_sae(sae_dir)
    tensors = {
        "W_enc": sae.W_enc_DF.detach(),
        "W_dec": sae.W_dec_FD.detach(),
        "b_enc": sae.b_enc_F.detach(),
        "b_dec": sae.b_dec_D.detach(),
        "threshold": sae.threshold.detach().expand(sae.d_sae),
    }
    with atomic_path(output) as tmp:
        tmp.mkdir(parents=True)
        save_file(
            {k: v.contiguous().float() for k, v in tensors.items()}, str(tmp / "sae_weights.safetensors")
        )
        write_json(
            tmp / "cfg.json",
            {
                "architecture": "jumprelu",
                "d_in": sae.d_in,
                "d_sae": sae.d_sae,
                "dtype": "float32",
                "device": "cpu",
                "apply_b_dec_to_input": True,
                "normalize_activations": "none",
                "reshape_activations": "none",
                "metadata": {
                    "hook_name": "lorascope.adapter_state",
                    "model_name": cfg.get("model"),
                    "lorascope_components": cfg["components"],
                    "lorascope_k": cfg["k"],
                },
            },
        )
    return output
