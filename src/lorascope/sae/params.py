"""``sae`` params: the cross-layer BatchTopK sparse autoencoder."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lorascope.extract.params import ExclusionSection
from lorascope.sections import Device, Fraction, PositiveFloat, PositiveInt, Precision, Section


class SaeSection(Section):
    """``sae``: the cross-layer BatchTopK sparse autoencoder over the whole adapter state."""

    k: PositiveInt = 16
    """Active latents per token (BatchTopK keeps k x batch activations per batch)."""
    expansion: PositiveInt = 8
    """d_sae = expansion x d_in (d_in = adapter components; 448 -> 3584 for Qwen2.5-32B)."""
    lr: PositiveFloat = 1e-3
    """Adam learning rate (peak of the warmup / stable / decay schedule)."""
    decoder_lr_scale: PositiveFloat = 10.0
    """The decoder rows' learning rate as a multiple of ``lr``. Adam moves every weight by about the lr
    whatever its size, and the rows are renormalised to unit norm after each step, so at ``lr`` the
    decoder's directions turn ~10x slower than SAELens's (rows initialised at norm 0.1 and used
    normalised). With ``scaling: global`` on data whose component scales span 100x this left FVU 0.185
    where SAELens reached 0.122 at the same lr; 10x gives 0.119 (``benchmarks/sae_quality.py``)."""
    batch_size: PositiveInt = 512
    """Tokens per optimizer step."""
    seed: int = 0
    """Seed for initialisation and token order."""
    epochs: PositiveFloat = 1
    """Passes over the training tokens (the store minus the held-out documents)."""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.01
    """Fraction of the steps with a linear learning-rate warmup."""
    decay_ratio: Fraction = 0.2
    """Fraction of the steps, at the end, with a linear decay to zero."""
    adam_betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    """Adam (beta1, beta2)."""
    scaling: Literal["per_component", "global"] = "per_component"
    """Input normalisation: each component divided by its own RMS (folded back into the weights at
    save), or one global scale so that E[||x||^2] = d_in."""
    b_dec_init: Literal["mean", "geometric_median"] = "mean"
    """Initial decoder bias: the data mean or its geometric median (Weiszfeld iterations)."""
    aux_k: PositiveInt = 256
    """Dead latents used by the AuxK loss per token (at most d_sae)."""
    aux_coef: Annotated[float, Field(ge=0)] = 0.03125
    """Weight of the AuxK loss (0 turns it off)."""
    dead_fraction: Fraction = 0.1
    """A latent is dead when it has not fired for this fraction of one epoch's tokens."""
    heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.05
    """Documents (chosen by a hash of their id) kept out of training for calibration and metrics."""
    calibration_tokens: PositiveInt = 200_000
    """Held-out tokens used to calibrate the inference threshold (mean L0 = k)."""
    checkpoint_steps: PositiveInt = 500
    """Save a resumable checkpoint (weights, optimiser, data position) every N steps."""
    drop_nonfinite: bool = False
    """Skip tokens with NaN/inf activations (counted) instead of stopping with an error."""
    kl_sequences: Annotated[int, Field(ge=0)] = 16
    """Held-out sequences for the downstream splice KL (0 skips it)."""
    device: Device = "auto"
    """Where training, calibration, evaluation and the splice KL run: ``auto`` (a CUDA GPU when
    present), ``cpu``, ``cuda`` or ``cuda:<index>``; shards are streamed to it one at a time."""
    precision: Precision = "auto"
    """Compute dtype of the base model + adapter in the splice KL (``auto``: bfloat16 on a GPU that
    supports it, float32 otherwise; KL in float32). The SAE's weights, Adam state and matmuls stay
    float32 in every precision (it is small; reduced precision would blur the top-k selection)."""
    exclude: ExclusionSection = Field(default_factory=ExclusionSection)
    """Tokens left out of training, calibration and evaluation (the splice KL keeps their recorded
    values: they are outside what the SAE models)."""
