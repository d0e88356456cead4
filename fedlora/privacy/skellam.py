"""Distributed DP on the secure sum: the Skellam mechanism (Agarwal, Kairouz, Liu, NeurIPS 2021).

Under ``dp-mode = "sample"`` with ``secure-aggregation = true`` the sites of a round
release one DP-SGD step *together*: each site clips every example's gradient to ``C``
(``max-grad-norm``), scales it to ``units`` integer steps per ``C`` and rounds it
stochastically (coins from OS entropy), appends ``count_weight`` for the example's count,
sums its examples, and adds its *share* of integer noise: a symmetric Skellam variable of
variance ``v / (t - m)`` per coordinate (two Poisson draws, from OS entropy), ``t`` being
``dp-min-honest`` and ``m`` ``dp-max-dropouts``. Sums of independent Skellam variables are
Skellam, so a sum of at least ``cohort - m`` contributors, at least ``t - m`` of them
honest, carries noise of variance at least ``v`` on every coordinate: one central DP-SGD
step on the union of the sites' data. The server unmasks only the sum; dividing the
gradient coordinates by the noised count is post-processing. (``dp-mode = "client"`` on the
secure sum uses the same noise on the sites' clipped updates,
:mod:`fedlora.privacy.distributed_user_level`.) Poisson rates are drawn in pieces of at most
:data:`POISSON_PIECE`, where numpy's double-precision sampler is accurate to about 1e-5 in
a draw's log-probability (not exact: far larger rates lose the draws' low bits), and a share
that would need rates above :data:`MAX_SHARE_RATE` is refused before any site trains.

Neighbouring relation: add or remove one training example of one site. One example moves
the sum by its own rounded vector: after clipping and scaling its gradient has L2 norm at
most ``units``, and rounding moves each of the ``dims`` coordinates by less than 1, so
``Delta_2 <= sqrt((units + sqrt(dims))^2 + count_weight^2)`` and
``Delta_1 <= sqrt(dims) * units + dims + count_weight`` whatever is in the batch.

Privacy (Corollary 3.6 of the paper, variance parametrisation), at every integer order
``a > 1``::

    eps(a) <= a Delta_2^2 / (2 v) + min(((2a - 1) Delta_2^2 + 6 Delta_1) / (4 v^2),
                                        3 Delta_1 / (2 v))

Because ``(2a - 1) / a < 2``, one step is dominated at every integer order by the Gaussian
mechanism of noise multiplier ``sigma = sqrt(v / (1 + k)) / Delta_2`` with
``k = (Delta_2^2 + 3 Delta_1) / (v Delta_2^2)`` (:meth:`SkellamSum.gaussian_equivalent`).
The site's ledger therefore records a distributed step as a full-batch Gaussian step of
that multiplier and is accounted at integer orders only (accountant ``rdp-int``): the
bound above is proven for integer orders. :meth:`SkellamSum.variance` inverts the
relation, so a plan's noise multiplier gives the variance the sites add.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..entropy import private_numpy_rng, stochastic_round
from .accounting import INTEGER_RDP_ORDERS

__all__ = ["INTEGER_ORDERS", "MAX_SHARE_RATE", "SIGMA_KEY", "SkellamSum", "VECTOR_KEY",
           "check_share", "epsilon_of_rdp", "skellam_share"]

#: What a site's training hands to its masking: its encoded vector, before its noise share,
#: and the plan's noise multiplier, from which the share follows.
VECTOR_KEY = "distributed-dp-sum"
SIGMA_KEY = "distributed-dp-sigma"

#: Integer Renyi orders: the Skellam bound is proven for these (the ledger's ``rdp-int``).
INTEGER_ORDERS = INTEGER_RDP_ORDERS
#: Integer steps per clip norm, over sqrt(dims): rounding then adds at most 1/RESOLUTION
#: to the L2 sensitivity.
RESOLUTION = 256


def epsilon_of_rdp(rdp: Sequence[float], orders: Sequence[float], delta: float) -> float:
    """(epsilon, delta) of an RDP curve (Balle et al. 2020, as Opacus converts)."""
    best = math.inf
    for r, a in zip(rdp, orders):
        if a <= 1:
            continue
        eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(best, 0.0)


@dataclass(frozen=True)
class SkellamSum:
    """The integer encoding of one distributed DP-SGD step over ``dims`` float coordinates."""

    dims: int
    units: int  # integer steps of a clipped gradient's norm (C maps to units)
    count_weight: int  # what each example adds to the count coordinate

    @classmethod
    def for_dims(cls, dims: int, resolution: int = RESOLUTION, *,
                 counted: bool = True) -> SkellamSum:
        """The encoding of ``dims`` coordinates; ``counted = False`` leaves the count
        coordinate at 0 (a sum whose number of terms is public: one update per site)."""
        if dims < 1:
            raise ValueError(f"dims must be >= 1, got {dims}")
        units = int(math.ceil(resolution * math.sqrt(dims)))
        return cls(dims=int(dims), units=units,
                   count_weight=int(math.ceil(units / 4)) if counted else 0)

    @property
    def length(self) -> int:
        """Coordinates summed: the gradient's, then the count."""
        return self.dims + 1

    @property
    def l2_sensitivity(self) -> float:
        return math.sqrt((self.units + math.sqrt(self.dims)) ** 2 + self.count_weight ** 2)

    @property
    def l1_sensitivity(self) -> float:
        return math.sqrt(self.dims) * self.units + self.dims + self.count_weight

    # -- privacy ------------------------------------------------------------------------
    def rdp(self, variance: float, orders: Sequence[float] = INTEGER_ORDERS) -> np.ndarray:
        """Corollary 3.6's bound on one step's RDP at each (integer) order."""
        d1, d2sq, v = self.l1_sensitivity, self.l2_sensitivity ** 2, float(variance)
        a = np.asarray(orders, dtype=np.float64)
        return a * d2sq / (2 * v) + np.minimum(((2 * a - 1) * d2sq + 6 * d1) / (4 * v * v),
                                               3 * d1 / (2 * v))

    def gaussian_equivalent(self, variance: float) -> float:
        """The noise multiplier of a Gaussian step whose RDP bounds this step's at every
        integer order."""
        d2sq, v = self.l2_sensitivity ** 2, float(variance)
        kappa = (d2sq + 3 * self.l1_sensitivity) / (v * d2sq)
        return math.sqrt(v / (1 + kappa) / d2sq)

    def variance(self, noise_multiplier: float) -> float:
        """The Skellam variance whose :meth:`gaussian_equivalent` is ``noise_multiplier``."""
        s2, d2sq = float(noise_multiplier) ** 2, self.l2_sensitivity ** 2
        extra = d2sq + 3 * self.l1_sensitivity
        return (s2 * d2sq + math.sqrt((s2 * d2sq) ** 2 + 4 * s2 * extra)) / 2

    def epsilon(self, variance: float, steps: int, delta: float) -> float:
        """Epsilon of ``steps`` such steps, straight from the Skellam bound (the check on
        the ledger's Gaussian-equivalent accounting)."""
        return epsilon_of_rdp(self.rdp(variance) * steps, INTEGER_ORDERS, delta)

    # -- a site's vector ------------------------------------------------------------------
    def encode(self, grads: np.ndarray, clip: float,
               rng: np.random.Generator | None = None) -> np.ndarray:
        """``(n, dims)`` per-example gradients, clipped to ``clip`` and scaled, rounded
        stochastically (unbiased; coins from OS entropy unless ``rng``) and summed, with
        the count appended: an int64 vector of :attr:`length`."""
        g = np.asarray(grads, dtype=np.float64).reshape(-1, self.dims)
        if not np.isfinite(g).all():
            raise ValueError("non-finite per-example gradients")
        norms = np.linalg.norm(g, axis=1, keepdims=True)
        scaled = g * (np.minimum(1.0, clip / np.maximum(norms, 1e-300)) * (self.units / clip))
        rounded = stochastic_round(scaled, rng)
        return np.concatenate([rounded.sum(axis=0),
                               [np.int64(self.count_weight) * len(g)]]).astype(np.int64)

    def bound_sum(self, vector: np.ndarray, max_examples: int) -> np.ndarray:
        """A site's sum with each coordinate clipped to what ``max_examples`` examples can
        add (a public bound, so the modulus never depends on the data). Clipping each
        coordinate moves no two sums further apart: the sensitivities stay."""
        v = np.asarray(vector, dtype=np.int64).copy()
        top = np.int64(max_examples) * (self.units + 1)
        v[:-1] = np.clip(v[:-1], -top, top)
        v[-1] = min(max(int(v[-1]), 0), int(max_examples) * self.count_weight)
        return v

    def decode(self, total: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
        """``(gradient sum in float units, noised example count)`` of a summed vector."""
        total = np.asarray(total, dtype=np.float64)
        if total.shape != (self.length,):
            raise ValueError(f"expected a vector of {self.length}, got {total.shape}")
        count = float(total[-1]) / self.count_weight if self.count_weight else 0.0
        return total[:-1] * (clip / self.units), count

    def max_abs(self, examples: int, variance: float, tail: float = 40.0) -> int:
        """A bound on any coordinate of a sum over ``examples`` examples plus noise of
        ``variance`` (``tail`` standard deviations: never reached in practice)."""
        per = max(self.units + 1, self.count_weight)
        return int(examples * per + tail * math.sqrt(variance)) + 1


#: The largest Poisson rate drawn at once: numpy's sampler works in double precision, and
#: its acceptance test loses precision as the rate grows (at 2^53 every draw is even; at
#: 2^36 a draw's log-probability is off by up to 3e-4, at 2^30 by about 7e-6).
POISSON_PIECE = 2.0 ** 30
#: The largest rate of a share's Poisson halves: a round asking for more is refused before
#: any site trains (:func:`check_share`), so a share takes at most 256 pieces.
MAX_SHARE_RATE = 2.0 ** 38


def check_share(variance: float, share: int) -> None:
    """``ValueError`` when a share of ``variance / share`` would need Poisson rates above
    :data:`MAX_SHARE_RATE` (a function of the run-config alone)."""
    lam = float(variance) / (2 * share)
    if not lam <= MAX_SHARE_RATE:
        raise ValueError(f"a noise share of variance {2 * lam:.4g} per coordinate is above "
                         f"what is drawn accurately ({2 * MAX_SHARE_RATE:.4g}): the plan's noise "
                         "multiplier is too large for this share (a larger target-epsilon or "
                         "more honest sites per sum)")


def _poisson(gen: np.random.Generator, lam: float, length: int) -> np.ndarray:
    """Poisson(``lam``) draws as sums of draws of rate at most :data:`POISSON_PIECE` (a sum
    of independent Poisson variables is Poisson), where numpy's sampler is accurate."""
    pieces = max(1, math.ceil(lam / POISSON_PIECE))
    out = np.zeros(length, dtype=np.int64)
    for _ in range(pieces):
        out += gen.poisson(lam / pieces, length).astype(np.int64)
    return out


def skellam_share(variance: float, share: int, length: int,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """One contributor's noise: symmetric Skellam of variance ``variance / share`` per
    coordinate, from OS entropy unless ``rng`` (tests only)."""
    if share < 1:
        raise ValueError(f"share must be >= 1, got {share}")
    check_share(variance, share)
    lam = float(variance) / (2 * share)
    gen = rng or private_numpy_rng()
    return _poisson(gen, lam, length) - _poisson(gen, lam, length)
