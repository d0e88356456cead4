"""A client's differential privacy across rounds: plan, budget check, ledger.

The math lives in :mod:`fedlora.privacy` (pure accounting); the training in
:mod:`fedlora.training`. This module ties them to a run-config: the noise multiplier is
calibrated once for the whole planned run, the client's accountant is kept across rounds
(in Flower's ``context.state`` in simulation, in a file at the site in deployment), and a
round that would exceed the budget is refused before any training happens.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import privacy

__all__ = ["DpPlan", "plan_for", "BudgetExhausted", "Ledger", "privatize_reply"]

log = logging.getLogger(__name__)


class BudgetExhausted(RuntimeError):
    """The client's next round would spend more than its privacy budget."""


@dataclass(frozen=True)
class DpPlan:
    """What one client's private round costs: ``steps`` Gaussian steps at rate ``sample_rate``."""

    mode: str
    noise_multiplier: float
    sample_rate: float
    steps: int  # accounted steps per round
    target_epsilon: float
    delta: float
    accountant: str


SIGMA_CACHE_FILE = "noise-multipliers.json"


@functools.lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int,
               accountant: str) -> float:
    """The calibrated noise multiplier, remembered in this process and in a small file in the
    user cache folder shared by every process (a deployed site starts a process per message;
    a simulation worker serves clients of many sizes). A remembered value is used only if
    it still meets the target under the accountant, so a stale or edited file can cost a
    recalibration, never privacy."""
    from .model_cache import cache_root

    key = f"{accountant}|{target_epsilon!r}|{delta!r}|{sample_rate!r}|{steps}"
    path = cache_root() / SIGMA_CACHE_FILE
    cached = _read_sigmas(path).get(key)
    if isinstance(cached, (int, float)) and cached > 0:
        spent = privacy.epsilon_of_history([(float(cached), sample_rate, steps)], delta=delta,
                                           accountant=accountant)
        if spent <= target_epsilon:
            return float(cached)
        log.warning("ignoring a remembered noise multiplier %s that gives epsilon %.4f > "
                    "target %s; recalibrating", cached, spent, target_epsilon)
    sigma = privacy.calibrate_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
        steps=steps, accountant=accountant)
    _remember_sigma(path, key, sigma)
    return sigma


def _read_sigmas(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember_sigma(path: Path, key: str, sigma: float) -> None:
    """Add one entry to the shared file (best effort: a read-only cache just is not used)."""
    from .model_cache import _locked
    from .results import atomic_write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_name(path.name + ".lock")):
            data = _read_sigmas(path)
            data[key] = sigma
            atomic_write_text(path, json.dumps(data, indent=0, sort_keys=True) + "\n")
    except OSError as e:
        log.debug("cannot remember the noise multiplier in %s: %s", path, e)


def plan_for(cfg: Any, num_examples: int) -> DpPlan | None:
    """The client's plan for a run-config, calibrated for all planned rounds (None if off).

    ``sample``: q = batch-size / n, ``local-steps`` steps a round. ``update``: one release a
    round with q = 1. ``client`` is the server's (:mod:`fedlora.central_dp`): a client
    plans only the part of ``dp-mode`` it runs itself (``sample`` of ``sample+client``).
    """
    local = privacy.parse_dp_mode(cfg.dp_mode) - {"client"}
    if not local:
        return None
    privacy.check_privacy_params(
        target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
        max_grad_norm=cfg.max_grad_norm, num_examples=num_examples, mode=cfg.dp_mode)
    mode = "+".join(sorted(local))
    if mode == "sample":
        q = min(1.0, cfg.batch_size / num_examples)
        per_round = cfg.local_steps  # the config refuses local-epochs with dp-mode = sample
    else:
        q, per_round = 1.0, 1
    total = privacy.planned_steps(num_rounds=cfg.num_server_rounds, local_steps=per_round)
    sigma = _calibrate(cfg.target_epsilon, cfg.target_delta, q, total, cfg.accountant)
    return DpPlan(mode=mode, noise_multiplier=sigma, sample_rate=q, steps=per_round,
                  target_epsilon=cfg.target_epsilon, delta=cfg.target_delta,
                  accountant=cfg.accountant)


class Ledger:
    """A client's accountant, loaded from and saved to where it lives.

    With a ``path`` (a site's node-config ``privacy-state-path``) the file is the record and
    survives restarts; otherwise the accountant lives in ``state`` (a dict-like record of
    Flower's ``context.state``). A ledger that cannot be read raises, never resets to zero.
    """

    def __init__(self, plan: DpPlan, *, path: str | None, state: Any) -> None:
        self.plan, self.path, self.state = plan, Path(path) if path else None, state
        acc = None
        if self.path is not None:
            acc = privacy.load_state(self.path)
        elif state is not None and len(state) > 0:
            acc = privacy.from_record_dict(dict(state))
        self.fresh = acc is None  # no record anywhere: a client new to this run
        if acc is None:
            acc = privacy.ClientAccountant(plan.accountant, target_epsilon=plan.target_epsilon,
                                           target_delta=plan.delta)
        if acc.mechanism != plan.accountant:
            raise privacy.PrivacyStateError(
                f"the privacy ledger uses the '{acc.mechanism}' accountant but the run asks for "
                f"'{plan.accountant}'; spent budget cannot be converted")
        self.accountant = acc

    def check(self) -> None:
        """Raise BudgetExhausted if this round would exceed the target epsilon."""
        p = self.plan
        if self.accountant.would_exceed(noise_multiplier=p.noise_multiplier,
                                        sample_rate=p.sample_rate, num_steps=p.steps,
                                        target_epsilon=p.target_epsilon, delta=p.delta):
            after = self.accountant.epsilon_after(noise_multiplier=p.noise_multiplier,
                                                  sample_rate=p.sample_rate, num_steps=p.steps,
                                                  delta=p.delta)
            raise BudgetExhausted(
                f"privacy budget exhausted: epsilon would reach {after:.4f} > target "
                f"{p.target_epsilon} (spent {self.epsilon():.4f} at delta {p.delta})")

    def charge_missed_rounds(self, rounds: int) -> None:
        """Charge ``rounds`` earlier rounds as if this client had trained in every one.

        A resumed simulation starts its clients with empty ``context.state``: the ledgers of
        the rounds before the restart are gone. Assuming the worst (it took part in all of
        them) keeps the reported epsilon an upper bound instead of restarting it at zero.
        """
        if rounds <= 0 or self.accountant.total_steps > 0:
            return
        p = self.plan
        self.accountant.step(noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate,
                             num_steps=p.steps * rounds)
        if self.path is not None:
            privacy.save_state(self.path, self.accountant)

    def spend(self) -> float:
        """Record this round's steps, persist the ledger, return the epsilon spent so far."""
        p = self.plan
        self.accountant.step(noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate,
                             num_steps=p.steps)
        if self.path is not None:
            privacy.save_state(self.path, self.accountant)
        return self.epsilon()

    def record(self) -> dict[str, Any]:
        """The accountant as plain values, for Flower's ``context.state``."""
        return privacy.to_record_dict(self.accountant)

    def metrics(self) -> dict[str, float | int | str]:
        """What the client reports to the server about its privacy spend."""
        p = self.plan
        return {"epsilon": self.epsilon(), "delta": p.delta, "noise-multiplier": p.noise_multiplier,
                "sample-rate": p.sample_rate, "steps": self.accountant.total_steps,
                "target-epsilon": p.target_epsilon}

    def epsilon(self) -> float:
        if self.accountant.total_steps == 0:
            return 0.0
        return self.accountant.epsilon(self.plan.delta)


def privatize_reply(
    trained: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    *,
    max_norm: float,
    noise_multiplier: float,
    seed: int,
) -> tuple[dict[str, np.ndarray], float]:
    """DP-LoRA: clip the update ``trained - received`` to ``max_norm`` (L2 over all
    tensors sent), add N(0, (sigma * max_norm)^2) to every entry, return received + noisy
    update and the update's norm before clipping."""
    keys = [k for k in trained if k in received]
    delta = {k: trained[k].astype(np.float64) - received[k] for k in keys}
    noised, norm = privacy.privatize_update(delta, max_norm=max_norm,
                                            noise_multiplier=noise_multiplier,
                                            rng=np.random.default_rng(seed))
    out = dict(trained)
    for k in keys:
        out[k] = (received[k].astype(np.float64) + noised[k]).astype(np.float32)
    return out, norm
