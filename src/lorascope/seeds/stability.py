"""What stays the same across training seeds: the adapter's directions and the SAE's features.

**Direction stability.** Per component, how well seed j's rank-r ``lora_A`` (and ``lora_B``) subspace
matches seed i's: the mean cosine of the principal angles between the two row spaces (for rank 1 the
``|cos|`` of the two vectors; the sign of a rank-1 pair is arbitrary: ``(A, B)`` and ``(-A, -B)`` are
the same adapter). Where the seeds trained other base models (the tiny profile varies ``base.seed``),
the coordinates mean different things and the figure is a chance baseline (~1/sqrt(width)).

**Feature stability.** SAE latents of two seeds matched one to one by decoder cosine (the Hungarian
assignment, ``scipy.optimize.linear_sum_assignment``), live latents only. A decoder row is in raw
``x . A`` units, whose per-component scale and sign are a seed's choice (``A`` can be longer and ``B``
shorter, or both negated), so each row is first taken to per-component normalised units (each
component divided by its RMS over the store) and component c of seed j is negated where seed j's
``lora_A`` of c points against seed i's. The share of latents matched at cosine >= ``MATCHED`` is over
the smaller of the two live sets; matched pairs are then compared by label and by category.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MATCHED = 0.9
"""Decoder cosine at which two seeds' latents count as the same feature."""


def subspace_similarity(U_RD: np.ndarray, V_RD: np.ndarray) -> float:
    """Mean cosine of the principal angles between the row spaces of ``U`` and ``V`` (|cos| for rank 1)."""
    Qu, _ = np.linalg.qr(np.asarray(U_RD, dtype=np.float64).T)
    Qv, _ = np.linalg.qr(np.asarray(V_RD, dtype=np.float64).T)
    return float(np.linalg.svd(Qu.T @ Qv, compute_uv=False).clip(0, 1).mean())


def direction_stability(
    a: Mapping[str, tuple[np.ndarray, np.ndarray]], b: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, dict[str, float]]:
    """Per component both seeds adapt: ``{"A": similarity of lora_A, "B": of lora_B}``; ``a`` and ``b``
    map a component name to its ``(A_RD, B_OR)`` (peft's ``lora_A.weight``, ``lora_B.weight``)."""
    out = {}
    for name in a:
        if name in b:
            (A1, B1), (A2, B2) = a[name], b[name]
            out[name] = {"A": subspace_similarity(A1, A2), "B": subspace_similarity(B1.T, B2.T)}
    return out


def component_signs(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], components: Sequence[str]
) -> np.ndarray:
    """Per component, +1 where seed b's rank-1 ``lora_A`` (``A_D``) points the way seed a's does, else -1."""
    return np.array([1.0 if float(np.dot(a[c].ravel(), b[c].ravel())) >= 0 else -1.0 for c in components])


@dataclass(frozen=True)
class FeatureMatch:
    """Seed a's and seed b's live latents paired one to one by decoder cosine."""

    pairs: list[tuple[int, int, float]]
    """(latent of a, latent of b, cosine), every assigned pair, best first."""
    live: tuple[int, int]
    """How many live latents each seed has."""

    @property
    def matched(self) -> list[tuple[int, int, float]]:
        return [p for p in self.pairs if p[2] >= MATCHED]

    @property
    def share(self) -> float:
        """Share of the smaller live set matched at cosine >= ``MATCHED``."""
        return len(self.matched) / max(min(self.live), 1)


def normalised_rows(W_dec_FD: np.ndarray, rms_D: np.ndarray, signs_D: np.ndarray | None = None) -> np.ndarray:
    """Decoder rows in per-component normalised units (signs applied), each scaled to unit length."""
    W = np.asarray(W_dec_FD, dtype=np.float64) / np.maximum(np.asarray(rms_D, dtype=np.float64), 1e-12)
    if signs_D is not None:
        W = W * signs_D
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)


def match_features(
    rows_a_FD: np.ndarray, live_a: Sequence[int], rows_b_FD: np.ndarray, live_b: Sequence[int]
) -> FeatureMatch:
    """The Hungarian assignment between two seeds' live latents (unit rows, see ``normalised_rows``)
    that maximises the summed cosine."""
    from scipy.optimize import linear_sum_assignment

    live_a, live_b = list(live_a), list(live_b)
    if not live_a or not live_b:
        return FeatureMatch([], (len(live_a), len(live_b)))
    cos = rows_a_FD[live_a] @ rows_b_FD[live_b].T
    ia, ib = linear_sum_assignment(-cos)
    pairs = sorted(
        ((live_a[i], live_b[j], float(cos[i, j])) for i, j in zip(ia, ib, strict=True)), key=lambda p: -p[2]
    )
    return FeatureMatch(pairs, (len(live_a), len(live_b)))


def agreement(
    pairs: Sequence[tuple[int, int, float]], a: Mapping[int, str], b: Mapping[int, str]
) -> float | None:
    """Share of matched pairs whose label (or category) is the same in both seeds; None without pairs
    that both label."""
    both = [(a[i], b[j]) for i, j, _ in pairs if i in a and j in b]
    if not both:
        return None
    return sum(x == y for x, y in both) / len(both)
