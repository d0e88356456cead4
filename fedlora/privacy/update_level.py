"""``dp-mode = update``: DP-LoRA, Gaussian noise on the update a client sends.

After ordinary local training, the client clips its update ``trained - received`` (one
vector over every tensor it sends) to L2 norm ``C`` = ``update-max-norm`` and adds
``N(0, (2 sigma C)^2)`` to every entry, from OS entropy, before anything leaves the site.

Neighbouring relation: any change of the client's local data (one example replaced,
added or removed, or the whole dataset). The server knows who was sampled and every
sampled client always sends an update, so there is no amplification by sampling
(``q = 1``, one step a round) and no "absent" case: two neighbouring datasets give two
clipped updates anywhere in the ball of radius ``C``, at distance up to ``2C``. The
sensitivity is therefore ``2C`` and the noise std ``sigma * 2C``, with ``sigma``
calibrated for ``num-server-rounds`` Gaussian steps at ``q = 1``. The guarantee holds
against everyone outside the site, the server included.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dp_sgd import dropout_off
from ..entropy import private_numpy_rng
from ..training import TrainResult
from .accounting import check_sigma, real_or_none
from .gaussian import clip_update, gaussian_noise_like
from .mechanisms import ClientMechanism, DpPlan, calibrated_sigma, register
from .reply_bound import gaussian_norm_bound

if TYPE_CHECKING:
    from ..run_config import RunConfig

log = logging.getLogger(__name__)

__all__ = ["SENSITIVITY_FACTOR", "UpdateLevel", "privatize_reply", "update_noise_std"]

#: Sensitivity of a clipped update under this mechanism's relation, in units of ``C``.
SENSITIVITY_FACTOR = 2.0


def update_noise_std(*, noise_multiplier: float, max_norm: float) -> float:
    """Std of the noise on each entry of a clipped update: ``sigma * 2C``."""
    sigma = check_sigma(noise_multiplier)
    c = real_or_none(max_norm)
    if c is None or c <= 0:
        raise ValueError(f"max_norm must be a finite float > 0, got {max_norm!r}")
    return sigma * SENSITIVITY_FACTOR * c


def privatize_reply(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], *,
                    max_norm: float, noise_multiplier: float,
                    rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """``received + clip(trained - received, C) + N(0, (sigma 2C)^2 I)`` over every tensor
    sent (each must have been received). ``rng`` defaults to a fresh
    generator from OS entropy (pass one only to test the statistics). The update's norm
    before clipping is not returned: it must not leave the site."""
    unsent = sorted(set(trained) - set(received))
    if unsent:  # a tensor with no starting point cannot be clipped: never send it un-noised
        raise ValueError(f"tensor(s) {unsent[:3]} were trained but not received")
    keys = list(trained)
    delta = {k: trained[k].astype(np.float64) - received[k] for k in keys}
    if not all(np.isfinite(d).all() for d in delta.values()):
        # A diverged update counts as no update: the noised release still goes out, so
        # whether the site replies says nothing about its data.
        log.warning("the local update has non-finite values; releasing noise on a zero update")
        delta = {k: np.zeros_like(d) for k, d in delta.items()}
    clipped, _ = clip_update(delta, max_norm)
    std = update_noise_std(noise_multiplier=noise_multiplier, max_norm=max_norm)
    noise = gaussian_noise_like(clipped, std, rng if rng is not None else private_numpy_rng())
    out = dict(trained)
    for k in keys:
        out[k] = (received[k].astype(np.float64) + clipped[k] + noise[k]).astype(np.float32)
    return out


@register
class UpdateLevel(ClientMechanism):
    name = "update"
    neighbouring = ("any change of one client's local data (sensitivity 2C: the clipped update "
                    "moves anywhere in a C-ball); against the server, other sites and whoever "
                    "holds the released adapters")

    releases_count = False  # a neighbour may be any other dataset: every reply weighs the same

    def plan_round(self, cfg: RunConfig, num_examples: int | None) -> tuple[float, int]:
        return 1.0, 1  # one release a round, no amplification: the server knows who was sampled

    def reply_norm_bound(self, cfg: RunConfig, server_round: int, released_count: int,
                         dims: int, start_norm: float) -> float | None:
        """``C`` plus a tail bound on the noise's norm."""
        sigma = calibrated_sigma(cfg.target_epsilon, cfg.target_delta, 1.0,
                                 cfg.num_server_rounds, cfg.accountant)
        std = update_noise_std(noise_multiplier=sigma, max_norm=cfg.update_max_norm)
        return cfg.update_max_norm + gaussian_norm_bound(dims, std)

    def train(self, model: Any, data: Any, indices: np.ndarray, *, plan: DpPlan, cfg: RunConfig,
              seed: int) -> Any:
        """Ordinary local training with dropout off: under a DP mode no randomness comes
        from ``seed``, which everyone holding the run-config knows."""
        if len(indices) == 0:  # no usable example: a zero update, noised like any other
            return TrainResult(loss=float("nan"), steps=0, examples=0)
        with dropout_off(model):
            return super().train(model, data, indices, plan=plan, cfg=cfg, seed=seed)

    def release(self, trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], *,
                plan: DpPlan, cfg: RunConfig) -> dict[str, np.ndarray]:
        return privatize_reply(trained, received, max_norm=cfg.update_max_norm,
                               noise_multiplier=plan.noise_multiplier)
