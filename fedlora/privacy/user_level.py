"""User-level differential privacy at the server (``dp-mode = client``): DP-FedAvg.

The privacy unit is a client: everything one client contributes over the whole run.
Each round, with ``C`` = ``update-max-norm``, ``q`` = ``fraction-train`` and ``sigma`` the
calibrated noise multiplier (McMahan et al. 2018, "Learning differentially private
recurrent language models", fixed-denominator estimator):

1. every connected node is sampled independently with probability ``q`` (Poisson
   sampling: what Opacus' analysis of the subsampled Gaussian assumes; the coins come from
   OS entropy), so the number of clients varies from round to round and may be zero;
2. each accepted reply is brought to the global layout and its update
   ``delta_k = reply_k - global`` (over the tensors the method sends: every tensor for
   fedavg, B and the head for ffa) is clipped to L2 norm ``C`` by the server, so a client
   cannot opt out of clipping;
3. ``global += (sum_k clip(delta_k) + N(0, (sigma C)^2 I)) / W`` with ``W = q N`` the
   expected number of sampled clients, fixed before round 1 (``N``: nodes connected then).

Times ``W``, step 3 is the sampled Gaussian mechanism on a sum whose L2 sensitivity to
zeroing out one client (or adding or removing it) is ``C``: one Opacus step ``(sigma, q)``
per round, composed
by a server-side accountant (:class:`fedlora.privacy.PrivacyBudget`, RDP or PRV per
``accountant``). A refused, failed or budget-exhausted reply adds zero, which keeps the
sensitivity, so no reply count has to match. ``sigma`` is calibrated before round 1 so
that ``num-server-rounds`` releases end at or just under ``target-epsilon`` at
``target-delta``, and ``target-delta`` must be below ``1/N``.

Neighbouring relation and adversary: zero-out of one client (all it contributes over the
run replaced by nothing: its reply adds zero, as a refused one does), with the population
``N`` public. The Poisson coins are the server's and do not depend on any data, so ``N``,
``W`` and how many nodes were sampled each round are the same for neighbours and are
published; the subsampled Gaussian's accounting is the same as for add/remove (a zeroed
client and an absent one add the same zero to a fixed-denominator sum). Whether a sampled
client replied, was refused or dropped out can depend on its data (a diverged update, a
bad file), so none of that is published: no per-round accepted/refused/dropped counts, no
reasons, no upload bytes, no client ledger rows (:mod:`fedlora.app.server.user_level_strategy`). The
server is trusted with the replies; the guarantee holds against whoever sees what the
server releases: the adapters, the log, ``metrics.json``, ``comms``, ``privacy.csv`` and the
report.
So the noise comes from OS entropy (never from ``seed``, which every holder of the
run-config knows; a resumed round draws fresh noise, never the same noise twice), and
nothing data-dependent about single clients is released: no update norms, no count of
clipped updates, no client-reported training loss or evaluation metrics
(:func:`fedlora.privacy.released_metrics`).

Relation to Flower. The clipping (FlatClip of ``reply - current``) and the noise on the
aggregate are those of ``flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping``
(``compute_clip_model_update``; ``compute_stdv`` gives ``sigma C / K``); the tests check
both against Flower's functions. The wrapper itself is not used because
(a) it calls ``ArrayRecord.to_numpy_ndarrays()``, which raises ``TypeError`` on fedlora's
raw-bytes arrays (``fedlora.wire.STYPE``); and, with numpy arrays, (b) it clips before
fedlora validates a reply, so a malformed reply stops the round instead of being refused;
(c) its noise std divides by a fixed ``num_sampled_clients`` while the wrapped aggregate is
a mean over the replies that pass validation, so one refused reply would leave too little
noise for the sensitivity ``C / K_accepted``; (d) its noise comes from the global
``np.random`` and lands on every array, FFA's frozen ``A`` included; (e) its optional accountant supports only ``FedAvg.aggregate_train``
without sampling amplification, where the issue asks for Opacus' RDP/PRV accountants.
The client-side ``fixedclipping_mod`` has the same stype limit and a client could skip it,
so clipping stays on the server.

Aggregators: the release is a mean of the tensors the clients send, so only aggregators
whose aggregate *is* that mean qualify: ``fedavg`` (A and B averaged separately) and
``ffa`` (B averaged, A frozen). ``svd`` releases the SVD of the mean of products
``B_k A_k``, which is not linear in the sent factors (its DP would need dense noise on
each product); ``stack`` concatenates every client's own factors, so there is no sum to
hide one client in. Both are refused with a :class:`~fedlora.config.ConfigError`.

Combinations: ``sample+client`` is DP-SGD on every client (record-level, the client's
own ledger) and this mechanism on top (user-level, the server's ledger); each guarantee
holds whatever the other does, so both budgets are met. ``update+client`` is refused: the
locally noised update is far longer than ``C`` and the central clipping would scale the
signal away.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..aggregation import Method, refit_state, state_rank
from ..config import ConfigError
from ..entropy import private_numpy_rng
from .budget import PrivacyBudget, PrivacyStateError
from .distributed_user_level import DistributedUserLevel
from .gaussian import clip_update, gaussian_noise_like
from .ledger import BudgetExhausted
from .mechanisms import (
    ServerMechanism,
    calibrated_sigma,
    check_privacy_params,
    client_mechanism,
    register,
)

if TYPE_CHECKING:
    from ..run_config import RunConfig

__all__ = ["CentralDp", "UserLevel", "check_population", "clip_and_sum", "noise_std",
           "private_mean_update"]

log = logging.getLogger(__name__)


def check_population(*, target_delta: float, num_clients: int) -> None:
    """Refuse ``target-delta >= 1/N`` for user-level DP over ``N`` clients (a larger delta
    would allow releasing one client's data outright)."""
    if num_clients < 1:
        raise ConfigError("target-delta", target_delta,
                          "a population of at least one client for dp-mode = 'client' "
                          "(no node is connected)")
    if target_delta >= 1 / num_clients:
        raise ConfigError("target-delta", target_delta,
                          f"a float below 1/N = {1 / num_clients:.6g} for N = {num_clients} "
                          "clients (user-level DP: the privacy unit is a client; typically "
                          "<= 1/(10 N))")


def noise_std(*, noise_multiplier: float, clip: float, denominator: float) -> float:
    """Std of the noise on the mean update: ``sigma * C / W`` (Flower's ``compute_stdv``)."""
    return noise_multiplier * clip / denominator


def clip_and_sum(updates: Sequence[Mapping[str, np.ndarray]], template: Mapping[str, np.ndarray],
                 *, clip: float) -> dict[str, np.ndarray]:
    """``sum_k clip(delta_k)`` in float64 over ``template``'s keys. Each update is clipped as
    one vector (L2 over all its tensors); the norms before clipping are not kept."""
    total = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in template.items()}
    for delta in updates:
        missing = sorted(set(template) - set(delta))
        if missing:
            raise ValueError(f"update lacks tensor(s) {missing[:3]}")
        clipped, _ = clip_update({k: np.asarray(delta[k], dtype=np.float64) for k in template},
                                 clip)
        for k in total:
            total[k] += clipped[k]
    return total


def private_mean_update(updates: Sequence[Mapping[str, np.ndarray]],
                        template: Mapping[str, np.ndarray], *, clip: float,
                        noise_multiplier: float, denominator: float,
                        rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """``(sum_k clip(delta_k) + N(0, (sigma C)^2 I)) / W``: the DP-FedAvg release (float64).
    ``template`` gives the released keys/shapes; ``rng`` defaults to a fresh generator from
    OS entropy (pass one only to test the statistics)."""
    if not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator!r}")
    total = clip_and_sum(updates, template, clip=clip)
    noise = gaussian_noise_like(total, noise_multiplier * clip,
                                rng if rng is not None else private_numpy_rng())
    return {k: (total[k] + noise[k]) / denominator for k in total}


class CentralDp:
    """The server's side of ``dp-mode = client``: sampling, release, accountant.

    Built once before round 1 by :meth:`from_config` (which calibrates ``sigma`` for the
    whole planned run); :meth:`start_round` fixes the population on its first call and
    refuses a round that would exceed the budget; :meth:`release` computes the new global
    adapter and records one accountant step.
    """

    def __init__(self, *, noise_multiplier: float, clip: float, sample_rate: float,
                 target_epsilon: float, delta: float, accountant: str = "rdp",
                 num_rounds: int, local_mode: str | None = None) -> None:
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.clip = float(clip)
        self.sample_rate = float(sample_rate)
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.num_rounds = int(num_rounds)
        self.local_mode = local_mode
        self.budget = PrivacyBudget(accountant, target_epsilon=target_epsilon,
                                                   target_delta=delta)
        self.population: int | None = None
        self.denominator: float | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> CentralDp:
        """The plan of a run-config, calibrated for ``num-server-rounds`` releases at
        ``q = fraction-train``."""
        UserLevel().check_config(cfg)
        check_privacy_params(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                             max_grad_norm=cfg.max_grad_norm, mode=cfg.dp_mode)
        sigma = calibrated_sigma(cfg.target_epsilon, cfg.target_delta, cfg.fraction_train,
                                 cfg.num_server_rounds, cfg.accountant)
        out = cls(noise_multiplier=sigma, clip=cfg.update_max_norm,
                  sample_rate=cfg.fraction_train, target_epsilon=cfg.target_epsilon,
                  delta=cfg.target_delta, accountant=cfg.accountant,
                  num_rounds=cfg.num_server_rounds,
                  local_mode=getattr(client_mechanism(cfg.dp_mode), "name", None))
        log.info("user-level DP: noise multiplier %.4f calibrated for %d rounds at q = %g "
                 "(epsilon %g, delta %g, %s accountant), clipping norm %g", sigma,
                 cfg.num_server_rounds, cfg.fraction_train, cfg.target_epsilon,
                 cfg.target_delta, cfg.accountant, cfg.update_max_norm)
        return out

    # -- rounds ------------------------------------------------------------------------
    def start_round(self, server_round: int, *, num_nodes: int) -> None:
        """Fix the population on the first call (delta check, ``W = q N``), then refuse a
        round whose release would exceed the budget (:class:`fedlora.privacy.BudgetExhausted`)."""
        if self.population is None:
            check_population(target_delta=self.delta, num_clients=num_nodes)
            self.population = int(num_nodes)
            self.denominator = self.sample_rate * num_nodes
            log.info("user-level DP: %d clients, each sampled with probability %g; "
                     "updates averaged over W = q N = %g", num_nodes, self.sample_rate,
                     self.denominator)
        elif num_nodes != self.population:
            log.info("round %d: %d nodes connected (population at round 1: %d); the "
                     "denominator W = %g stays fixed", server_round, num_nodes,
                     self.population, self.denominator)
        if self.budget.would_exceed(noise_multiplier=self.noise_multiplier,
                                        sample_rate=self.sample_rate, num_steps=1,
                                        target_epsilon=self.target_epsilon, delta=self.delta):
            raise BudgetExhausted(
                f"user-level privacy budget exhausted: round {server_round} would take epsilon "
                f"above {self.target_epsilon} (spent {self.epsilon():.4f} at delta {self.delta} "
                f"after {self.budget.total_steps} releases)")

    def sample(self, nodes: Sequence[int], rng: np.random.Generator | None = None) -> list[int]:
        """Each node independently with probability ``q`` (Poisson sampling); the coins come
        from OS entropy unless a test passes ``rng``."""
        rng = rng if rng is not None else private_numpy_rng()
        picks = rng.random(len(nodes)) < self.sample_rate
        return sorted(int(n) for n, keep in zip(nodes, picks) if keep)

    def release(self, server_round: int, global_state: Mapping[str, np.ndarray],
                replies: Sequence[Mapping[str, np.ndarray]], method: Method,
                rng: np.random.Generator | None = None,
                reference: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The new global adapter from the accepted replies (each clipped, the mean noised,
        the noise from OS entropy unless a test passes ``rng``) and one accountant step.

        A reply's update is measured from ``reference`` (what the clients received: the
        global adapter as the wire rounded it; default the global itself) and applied to
        the global adapter. Only the tensors ``method`` sends are released; the others
        (FFA's frozen ``A``) stay as they are.
        """
        if self.denominator is None:
            raise RuntimeError("start_round must be called before release")
        template = {k: np.asarray(global_state[k], dtype=np.float64)
                    for k in method.payload(dict(global_state))}
        base = {k: np.asarray((reference or global_state)[k], dtype=np.float64)
                for k in template}
        updates = []
        for reply in replies:
            rank = state_rank(reply)
            if rank is not None and rank != method.rank:  # a site of its own rank
                reply = refit_state(reply, rank=method.rank, from_scale=method.alpha / rank,
                                    to_scale=method.scale)
            updates.append({k: np.asarray(reply[k], dtype=np.float64) - base[k]
                            for k in template})
        mean = private_mean_update(updates, template, clip=self.clip,
                                   noise_multiplier=self.noise_multiplier,
                                   denominator=self.denominator, rng=rng)
        out = {k: np.asarray(v, dtype=np.float32) for k, v in global_state.items()}
        for k, d in mean.items():
            out[k] = (template[k] + d).astype(np.float32)
        self.budget.step(noise_multiplier=self.noise_multiplier,
                             sample_rate=self.sample_rate, num_steps=1)
        log.info("round %d: user-level DP release, noise std %.3g on the mean update; "
                 "epsilon %.4f", server_round,
                 noise_std(noise_multiplier=self.noise_multiplier, clip=self.clip,
                           denominator=self.denominator), self.epsilon())
        return out

    # -- reporting and state ---------------------------------------------------------
    def epsilon(self) -> float:
        """User-level epsilon spent so far at ``target-delta``."""
        if self.budget.total_steps == 0:
            return 0.0
        return self.budget.epsilon(self.delta)

    def metrics(self) -> dict[str, float | int | str]:
        """One privacy.csv row's values (the keys clients use for theirs)."""
        return {"mode": "client", "epsilon": self.epsilon(), "delta": self.delta,
                "noise-multiplier": self.noise_multiplier, "sample-rate": self.sample_rate,
                "steps": self.budget.total_steps, "target-epsilon": self.target_epsilon}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state for a checkpoint (accountant history, population)."""
        return {"accountant": self.budget.state_dict(), "population": self.population,
                "denominator": self.denominator, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "clip": self.clip}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state_dict` output; refuses none at all, one from a different
        plan, and one that forgets recorded releases (spent budget is never reset)."""
        if not isinstance(state, Mapping):
            raise PrivacyStateError(
                "no user-level privacy ledger to restore; refusing to start from zero spent "
                "budget")
        for key in ("noise_multiplier", "sample_rate", "clip"):
            if not math.isclose(float(state[key]), getattr(self, key), rel_tol=1e-12):
                raise PrivacyStateError(
                    f"checkpoint has {key} {state[key]!r}, this run {getattr(self, key)!r}")
        self.budget.load_state_dict(state["accountant"])
        self.population = None if state["population"] is None else int(state["population"])
        self.denominator = None if state["denominator"] is None else float(state["denominator"])


@register
class UserLevel(ServerMechanism):
    name = "client"
    neighbouring = ("zero-out of one client, with all it contributes over the run, the "
                    "population N public (user-level); against whoever sees what the server "
                    "releases (the server itself is trusted with the replies)")
    needs_linear_aggregator = True
    aggregator_reason = ("user-level DP noises the mean of the sent tensors, and this "
                         "aggregator's global adapter is not that mean")
    accepts_local = ("sample",)

    def server_hook(self, cfg: RunConfig) -> CentralDp | None:
        """The server's release (None on the secure sum: the sites release together)."""
        return None if cfg.secure_aggregation else CentralDp.from_config(cfg)

    def site_side(self, cfg: RunConfig) -> DistributedUserLevel | None:
        return DistributedUserLevel() if cfg.secure_aggregation else None
