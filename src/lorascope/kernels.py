"""Pinned CPU float kernels: the same bytes from a CPU run on any x86-64 machine with AVX2.

A float32 matmul or reduction on the CPU takes the code path its libraries pick for the machine's
instruction set and vendor: ATen's vectorised kernels (AVX2 or AVX-512), oneDNN's JIT kernels (up to
AVX-512/AMX) and MKL's BLAS (its own dispatch per CPU). Each path sums in another order, so a seeded,
single-threaded training run writes other weights on an AMD AVX2 machine than on an Intel AVX-512 one,
and every later output moves with them. Three environment variables, read by the libraries when they
first dispatch, pin all three paths:

* ``ATEN_CPU_CAPABILITY``: ATen's vector kernels (``default`` | ``avx2`` | ``avx512``);
* ``ONEDNN_MAX_CPU_ISA``: the highest ISA oneDNN may use (``AVX2``, ``AVX512_CORE``, ...);
* ``MKL_CBWR``: MKL's conditional numerical reproducibility branch (``AVX2``, ``COMPATIBLE``, ...).

The ISA cap alone leaves Intel and AMD apart (MKL still dispatches by vendor), CBWR alone leaves AVX-512
machines apart from AVX2 ones (ATen and oneDNN ignore it); the pair gives equal float32 bytes across
vendors. ``kernels.pin`` (``auto``: on unless a GPU is visible) decides whether a process sets them; it
must happen before torch is imported (``lorascope.cli`` does it right after the params are loaded), and
tests set the same defaults in ``conftest.py``. On a GPU the bytes may differ whatever the CPU does.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lorascope.sections import Section

ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")
"""The variables pinned, in the order ``KernelsSection`` sets them."""


class KernelsSection(Section):
    """``kernels``: the CPU float kernels every ``lorascope`` process pins before torch loads. Every stage
    reads it: a change re-runs the pipeline (other kernels, other bytes)."""

    pin: Literal["auto", "on", "off"] = "auto"
    """``auto``: pin unless a GPU is visible (``/dev/nvidia*`` or ``/dev/kfd``, and ``CUDA_VISIBLE_DEVICES``
    not empty or ``-1``); ``on``: always; ``off``: the libraries pick for the machine (faster on AVX-512,
    other bytes on other CPUs)."""
    aten: Literal["default", "avx2", "avx512"] = "avx2"
    """``ATEN_CPU_CAPABILITY``: ATen's vector kernels (``avx2``: what every x86-64 machine of the last
    decade runs; ``avx512`` pins to AVX-512 machines only)."""
    onednn: str = "AVX2"
    """``ONEDNN_MAX_CPU_ISA``: the highest instruction set oneDNN's kernels may use."""
    mkl_cbwr: str = "COMPATIBLE"
    """``MKL_CBWR``: MKL's reproducibility branch. ``COMPATIBLE`` (SSE2 without approximate reciprocals) is
    the one MKL honours on every vendor; ``AVX2`` is honoured on Intel only (MKL runs its own dispatch on
    AMD), so Intel and AMD machines write other bytes with it (docs/kernels.md, "Same bytes on any CPU")."""


def gpu_visible() -> bool:
    """Whether this process would see a GPU, judged without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    dev = Path("/dev")
    return Path("/dev/kfd").exists() or any(dev.glob("nvidia[0-9]*"))


def wanted(cfg: KernelsSection) -> dict[str, str]:
    """The environment ``cfg`` asks for (empty: leave the libraries to pick)."""
    if cfg.pin == "off" or (cfg.pin == "auto" and gpu_visible()):
        return {}
    return dict(zip(ENV, (cfg.aten, cfg.onednn, cfg.mkl_cbwr), strict=True))


def pin(cfg: KernelsSection) -> dict[str, str]:
    """Set the variables ``cfg`` asks for, before torch loads; returns what is in force. In a process
    that has already imported torch (a test, a notebook) the kernels are fixed: nothing is changed, and
    a warning says so when they differ from what ``cfg`` asks for."""
    want = wanted(cfg)
    if "torch" in sys.modules:
        differ = {k: v for k, v in want.items() if os.environ.get(k) != v}
        if differ:
            warnings.warn(
                f"kernels: torch is already imported, so {', '.join(f'{k}={v}' for k, v in differ.items())} "
                "cannot take effect in this process",
                RuntimeWarning,
                stacklevel=2,
            )
    else:
        os.environ.update(want)
    return in_force()


def in_force() -> dict[str, str]:
    """The pinning variables of this process (``native`` where unset), plus the vector ISA ATen runs
    when torch is loaded (``aten.capability``: what ATen really dispatches to)."""
    out = {k: os.environ.get(k, "native") for k in ENV}
    if "torch" in sys.modules:
        import torch

        out["aten.capability"] = str(torch.backends.cpu.get_cpu_capability())
    return out


def sqrt(x: Any) -> Any:
    """``torch.sqrt(x)``, the same on every CPU. On the CPU ATen hands ``sqrt`` (and ``pow(x, 0.5)``) to MKL's
    vector math, whose square root is not correctly rounded and comes out differently on other CPUs even
    with ``MKL_CBWR`` pinned (``benchmarks/kernels.py``); numpy's is the IEEE one, the same everywhere."""
    import torch

    if x.device.type != "cpu":
        return torch.sqrt(x)
    return torch.from_numpy(np.sqrt(x.detach().numpy()))
