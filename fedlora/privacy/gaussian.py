"""The Gaussian mechanism on adapter updates: clipping to an L2 norm, and noise.

Shared by the mechanisms that clip a whole update (DP-LoRA update noise on a client,
user-level DP-FedAvg on the server). Noise is always drawn from a generator of
:mod:`fedlora.entropy`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .accounting import real_or_none

__all__ = ["clip_update", "gaussian_noise_like", "global_norm"]


def global_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """``sqrt(sum_k ||a_k||^2)`` over all arrays, in float64."""
    total = 0.0
    for a in arrays.values():
        a64 = np.asarray(a, dtype=np.float64)
        total += float(np.dot(a64.ravel(), a64.ravel()))
    return math.sqrt(total)


def clip_update(delta: Mapping[str, np.ndarray], max_norm: float
                ) -> tuple[dict[str, np.ndarray], float]:
    """Scale the update by ``min(1, C / ||delta||_2)`` (global L2 norm over all arrays).

    Returns ``(clipped, original_norm)``; arrays keep their dtype and the clipped norm is
    ``<= max_norm`` after rounding too. Non-finite values raise ValueError. The original
    norm is data-dependent: it must not leave the place where the clipping happens.
    """
    c = real_or_none(max_norm)
    if c is None or c <= 0:
        raise ValueError(f"max_norm must be a finite float > 0, got {max_norm!r}")
    arrays = {k: np.asarray(v) for k, v in delta.items()}
    for k, a in arrays.items():
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"update array {k!r} has dtype {a.dtype}, expected a float dtype")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"update array {k!r} has non-finite values")
    norm = global_norm(arrays)
    if norm <= c:
        return {k: a.copy() for k, a in arrays.items()}, norm
    factor = c / norm
    for _ in range(8):
        clipped = {k: (a.astype(np.float64) * factor).astype(a.dtype) for k, a in arrays.items()}
        if global_norm(clipped) <= c:
            return clipped, norm
        factor *= 1 - 1e-6  # rounding to the array dtype overshot: shrink a hair
    raise ArithmeticError("could not clip the update under max_norm")  # pragma: no cover


def gaussian_noise_like(arrays: Mapping[str, np.ndarray], std: float,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Independent ``N(0, std^2)`` entries shaped like each array, in float64.

    ``rng`` must come from :func:`fedlora.entropy.private_numpy_rng` wherever a
    guarantee rests on the noise.
    """
    s = real_or_none(std)
    if s is None or s < 0:
        raise ValueError(f"std must be a finite float >= 0, got {std!r}")
    return {k: rng.standard_normal(np.shape(a)) * s for k, a in arrays.items()}
