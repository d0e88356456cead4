"""Failures a simulation injects at its sites (``dropout-fraction``, ``straggler-fraction``)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedlora.run_config import RunConfig

__all__ = ["SimulatedFailure", "simulate_failure", "simulated_fate"]

log = logging.getLogger("fedlora.client")


class SimulatedFailure(RuntimeError):
    """A failure injected by ``dropout-fraction`` (simulation of a crashing site)."""


def simulated_fate(cfg: RunConfig, server_round: int, partition_id: int | None) -> str:
    """``"drop"``, ``"straggle"`` or ``"ok"`` for this client in this round.

    Drawn from (seed, round, partition): reproducible, independent across rounds, and the
    same whichever worker process serves the client.
    """
    if cfg.dropout_fraction <= 0 and cfg.straggler_fraction <= 0:
        return "ok"
    u = np.random.default_rng([cfg.seed, server_round, partition_id or 0, 0x5EED]).random()
    if u < cfg.dropout_fraction:
        return "drop"
    if u < cfg.dropout_fraction + cfg.straggler_fraction:
        return "straggle"
    return "ok"


def simulate_failure(cfg: RunConfig, server_round: int, partition_id: int | None) -> None:
    """Fail or straggle as ``dropout-fraction`` / ``straggler-fraction`` ask (simulation)."""
    fate = simulated_fate(cfg, server_round, partition_id)
    if fate == "drop":
        raise SimulatedFailure(f"simulated failure of partition {partition_id} in round "
                               f"{server_round} (dropout-fraction {cfg.dropout_fraction})")
    if fate == "straggle":
        log.info("Straggling: replying %.1f s late (straggler-fraction)", cfg.straggler_delay)
        time.sleep(cfg.straggler_delay)
