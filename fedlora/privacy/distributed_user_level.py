"""Distributed user-level DP: ``dp-mode = "client"`` with ``secure-aggregation = true``.

Under ``client`` alone the server clips and noises each site's update (DP-FedAvg,
:mod:`fedlora.privacy.user_level`) and must be trusted with every update. On the secure
sum no one sees a single update, so the sites do the server's part themselves and the
noise is added once, in shares:

1. a site trains as a non-private round does (its update needs no noise of its own);
2. it clips its update ``delta = trained - received`` (over the tensors the aggregator
   sends, sorted by key) to L2 norm ``C`` = ``update-max-norm``, scales it to
   ``K = ceil(256 sqrt(d))`` integer steps per ``C`` and rounds it stochastically (coins
   from OS entropy): :class:`~fedlora.privacy.skellam.SkellamSum` without a count
   coordinate (how many sites are in a sum is public);
3. just before masking it adds its share of the noise, symmetric Skellam of variance
   ``v / (t - m)`` per coordinate (``t`` = ``dp-min-honest``, ``m`` = ``dp-max-dropouts``),
   as distributed DP-SGD does (:func:`fedlora.distributed_dp.noised`);
4. the server unmasks only the sum of at least ``cohort - m`` contributors and adds
   ``C / K x sum / survivors`` to the global adapter: post-processing.

Neighbouring relation: zero-out of one site (everything it contributes over the run
replaced by update 0), with who took part in each round public (the server picks the
cohorts and sees who answers). One site moves a round's sum by its own rounded vector:
L2 at most ``K + sqrt(d)``, L1 at most ``sqrt(d) K + d``, whatever it trained.

Participation cap instead of amplification: the server picks the cohorts, so sampling
amplification (which needs coins no one controls) is not claimed. Each site calibrates
its noise for at most ``participation-cap`` releases (``P``; by default
``ceil(num-server-rounds x fraction-train)``), each one Skellam step accounted as its
Gaussian equivalent at integer orders (accountant ``rdp-int``,
:meth:`~fedlora.privacy.skellam.SkellamSum.gaussian_equivalent`), and its ledger refuses a
release beyond its cap (``target-epsilon`` or its own ``max-epsilon``). Whether a site
refuses then depends on how often it was picked, never on its data. The server picks each
round's cohort among the sites under the cap, the least used first.

The guarantee is the site's: its ledger charges each round before it trains (a failed
round is paid for, and sends update 0 masked as any other), its share's floor and its
acceptance of the mode are in its node-config (:mod:`fedlora.privacy.site_policy`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ConfigError
from ..secure_sum import flat_update
from .mechanisms import ClientMechanism, DpPlan, calibrated_sigma, check_privacy_params
from .skellam import SIGMA_KEY, VECTOR_KEY, SkellamSum

if TYPE_CHECKING:
    from ..run_config import RunConfig

__all__ = ["DistributedUserLevel", "participation_cap", "update_spec", "update_vector"]

#: The accountant of the sites' ledgers: the Skellam bound is proven at integer orders.
ACCOUNTANT = "rdp-int"


def participation_cap(cfg: RunConfig) -> int:
    """The most rounds one site contributes to: ``participation-cap``, else
    ``ceil(num-server-rounds x fraction-train)`` (at least 1)."""
    if cfg.participation_cap:
        return int(cfg.participation_cap)
    return max(1, math.ceil(cfg.num_server_rounds * cfg.fraction_train - 1e-9))


def update_spec(payload: Mapping[str, Any]) -> SkellamSum:
    """The encoding of one site's update over the tensors the aggregator sends."""
    dims = sum(int(np.prod(np.shape(payload[k]))) for k in payload)
    return SkellamSum.for_dims(dims, counted=False)


def update_vector(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                  clip: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """A site's update (``trained - received`` over ``received``'s keys, sorted), clipped to
    L2 norm ``clip`` as one vector, scaled and rounded: the int64 vector it masks (before its
    noise share). A non-finite entry counts as 0 there (the site's log says so elsewhere)."""
    keys = sorted(received)
    if sorted(trained) != keys:
        raise ValueError("the trained tensors must be exactly the received ones")
    update = flat_update(trained, received, keys)
    update[~np.isfinite(update)] = 0.0
    spec = update_spec(received)
    return spec.bound_sum(spec.encode(update[None, :], clip, rng), 1)


class DistributedUserLevel(ClientMechanism):
    """The site's part of ``client`` on the secure sum (not registered by name: it is what
    ``dp-mode = "client"`` runs at a site when ``secure-aggregation = true``)."""

    name = "client"
    neighbouring = ("zero-out of one site, with all it contributes over the run; who takes "
                    "part in each round is public (user-level, distributed: no one sees a "
                    "single update); against the server, the other sites and whoever holds "
                    "the released adapters, while dp-min-honest sites of each round add "
                    "their share")
    needs_linear_aggregator = True
    aggregator_reason = ("the secure sum releases the mean of the sent tensors, and this "
                         "aggregator's global adapter is not that mean")
    releases_count = False

    def check_config(self, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.accountant == "prv":
            raise ConfigError("accountant", cfg.accountant,
                              "rdp with dp-mode = 'client' and secure-aggregation = true (the "
                              "Skellam mechanism's bound is a Renyi-DP bound)")
        cap = participation_cap(cfg)
        if cap > cfg.num_server_rounds:
            raise ConfigError("participation-cap", cfg.participation_cap,
                              f"0 or at most num-server-rounds = {cfg.num_server_rounds}")

    def sigma(self, cfg: RunConfig) -> float:
        """The noise multiplier of every release: ``target-epsilon`` for the cap's releases."""
        return calibrated_sigma(cfg.target_epsilon, cfg.target_delta, 1.0,
                                participation_cap(cfg), ACCOUNTANT)

    def plan_accountant(self, cfg: RunConfig) -> str:
        return ACCOUNTANT

    def plan_round(self, cfg: RunConfig, num_examples: int | None) -> tuple[float, int]:
        return 1.0, 1  # one release of the whole update per round taken part in

    def plan(self, cfg: RunConfig, num_examples: int | None) -> DpPlan:
        check_privacy_params(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                             max_grad_norm=cfg.max_grad_norm, mode=cfg.dp_mode)
        return DpPlan(mode=self.name, noise_multiplier=self.sigma(cfg), sample_rate=1.0,
                      steps=1, target_epsilon=cfg.target_epsilon, delta=cfg.target_delta,
                      accountant=ACCOUNTANT)

    def describe(self, cfg: RunConfig) -> str:
        return (f"dp-mode client, distributed: each site clips its update to "
                f"{cfg.update_max_norm:g} and adds its share of Skellam noise of noise "
                f"multiplier {self.sigma(cfg):.4g} for dp-min-honest = {cfg.dp_min_honest:g}; "
                f"the server sees only the sum; at most {participation_cap(cfg)} rounds per "
                f"site (participation-cap), target-epsilon {cfg.target_epsilon:g}")

    def release(self, trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], *,
                plan: DpPlan, cfg: RunConfig) -> dict[str, np.ndarray]:
        return {VECTOR_KEY: update_vector(trained, received, float(cfg.update_max_norm)),
                SIGMA_KEY: np.asarray([plan.noise_multiplier])}
