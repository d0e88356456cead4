"""Randomness that a privacy guarantee rests on: drawn from the operating system's entropy.

Every draw a DP guarantee rests on (Gaussian noise, Poisson sampling masks, DP node
sampling) comes from a generator seeded here with 256 fresh bits from ``os.urandom``
(through :mod:`secrets`), at each use. Never from the run-config's ``seed``: the server,
every site and anyone holding ``config.json`` know that seed, and could regenerate noise
seeded from it and subtract it. ``seed`` keeps making everything else (data splits, LoRA
initialisation, batch order, dropout) repeatable.

Torch generators live on the device of the tensors they noise (Opacus draws its noise
with the generator it is given, on the parameters' device).
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

__all__ = ["private_numpy_rng", "private_torch_generator", "stochastic_round"]


def private_numpy_rng() -> np.random.Generator:
    """A PCG64 generator seeded with 256 bits of OS entropy: unpredictable to everyone."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(256)))


def private_torch_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with 64 bits of OS entropy."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(secrets.randbits(64))
    return gen


def stochastic_round(values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """``values`` rounded to an integer below or above, up with probability the fraction:
    unbiased, as int64; the coins from OS entropy unless ``rng`` (tests only)."""
    low = np.floor(values)
    coins = (rng or private_numpy_rng()).random(np.shape(values))
    return (low + (coins < values - low)).astype(np.int64)
