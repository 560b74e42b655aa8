"""Seeded percentile bootstrap over questions: what every CI of lorascope resamples with (``evaluate``'s
scores and recoveries, ``attribute``'s Δaccuracy). The generator is seeded from a seed and a key naming what
is resampled, so a CI is the same bytes in every run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

PERCENTILES = (2.5, 97.5)
"""The bounds of a central 95% interval."""


def rng(seed: int, *key: Any) -> np.random.Generator:
    """A generator seeded from ``seed`` and a key naming what it resamples."""
    digest = hashlib.sha256(json.dumps([seed, *key]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def resamples(n: int, iters: int, gen: np.random.Generator) -> np.ndarray:
    """``iters`` bootstrap resamples of ``n`` question indices, shape ``[iters, n]``."""
    return gen.integers(0, n, size=(iters, n))


def interval(values: np.ndarray) -> tuple[float, float]:
    """The central 95% percentile interval of bootstrap ``values``."""
    lo, hi = np.percentile(values, PERCENTILES)
    return float(lo), float(hi)
