"""User-level DP as a wrapper around the fedlora strategy (``dp-mode = client``).

As Flower's ``DifferentialPrivacyServerSideFixedClipping`` wraps a strategy, this wraps a
:class:`fedlora.app.server.strategy.LoraStrategy`: the inner strategy still sends the global adapter
and validates every reply; the wrapper replaces how nodes are sampled (each one
independently with probability q, the coins from OS entropy) and what is released (the
clipped updates' noised mean, :class:`fedlora.privacy.CentralDp`, with one step on the
server's own accountant), every round whatever the number of valid replies
(``min-train-nodes`` does not apply). No update norm is measured or refused on.

What the server publishes (log, ``metrics.json``, ``comms``, ``privacy.csv``, report) is
what the zero-out relation with ``N`` public allows (:mod:`fedlora.privacy.user_level`):
``N``, ``W`` and the number of nodes sampled each round (the server's own coins), never
which sampled nodes replied, were refused or dropped out, nor anything that follows from
it (their count, reasons, upload bytes, the clients' own ledger rows): a client's data can
decide whether it replies. Outputs name no node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedlora.privacy import CentralDp
from fedlora.wire import to_record

from .round_outcome import WrappingStrategy, weighted_metrics
from .strategy import LoraStrategy

log = logging.getLogger("fedlora.server")

__all__ = ["UserLevelDpStrategy"]


class UserLevelDpStrategy(WrappingStrategy):
    """``strategy`` with user-level DP: Poisson node sampling and a noised release."""

    def __init__(self, strategy: LoraStrategy, central: CentralDp) -> None:
        super().__init__(strategy)
        self.strategy: LoraStrategy = strategy
        self.central = central
        if not (strategy.dp_on and strategy.hide_nodes and not strategy.measure_norms):
            raise ValueError("user-level DP wraps a strategy built with central_release=True")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Each node with probability q; refuses a round beyond the server's budget."""
        nodes = self.strategy.ordered_nodes(grid)
        self.central.start_round(server_round, num_nodes=len(nodes))
        return self.strategy.send_train(server_round, arrays, config,
                                        self.central.sample(nodes), grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The noised mean of the clipped updates of the valid replies (none: noise only)."""
        states, weights, metrics = self.strategy.collect_train(server_round, replies)
        outcome = self.strategy.outcome
        if self.central.local_mode:  # the clients' own (record-level) ledgers
            for _, values in outcome.privacy:
                values.setdefault("mode", self.central.local_mode)
        merged = self.central.release(server_round, self.strategy.global_state, states,
                                      self.strategy.method, reference=self.strategy.received)
        outcome.privacy.append(("server", self.central.metrics()))
        return to_record(merged), weighted_metrics(metrics, weights) if metrics else None

    def state_dict(self) -> dict:
        """The inner strategy's state and the server's user-level ledger (never reset)."""
        return {**self.strategy.state_dict(), "central-dp": self.central.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state)
        self.central.load_state_dict(state.get("central-dp"))

    def summary(self) -> None:
        self.strategy.summary()
        log.info("UserLevelDpStrategy: q = %g, clip %g, noise multiplier %.4f",
                 self.central.sample_rate, self.central.clip, self.central.noise_multiplier)
