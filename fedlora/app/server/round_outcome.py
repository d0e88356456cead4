"""One round as the server loop sees it: the strategy runs it and returns what it did.

:class:`RoundStrategy` is the Flower strategy API plus :meth:`RoundStrategy.train_round`
and :meth:`RoundStrategy.evaluate_round`, which send, receive and aggregate one round and
return its :class:`RoundOutcome`: the new global adapter, the aggregated metrics and what
happened to every reply. The loop in :mod:`fedlora.app.server.server_app` reads only that.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.actor_pool import DIED_MARKERS
from fedlora.timing import RoundTimer

__all__ = ["RoundOutcome", "RoundStrategy", "WrappingStrategy", "short_reason",
           "weighted_metrics"]


@dataclass
class RoundOutcome:
    """What one round did: the new global adapter (None: unchanged), the aggregated
    training metrics, and what happened to the replies (for metrics and logs)."""

    arrays: ArrayRecord | None = None
    train_metrics: MetricRecord | None = None

    sampled: int = 0
    sampled_nodes: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    # Sampled nodes whose reply never came (timed out) or came back as an error from
    # Flower (the node went offline, its ClientApp crashed): (node, reason).
    dropped: list[tuple[int, str]] = field(default_factory=list)
    privacy: list[tuple[int, dict]] = field(default_factory=list)  # (node, dp-* metrics)
    update_norms: list[float] = field(default_factory=list)  # of the accepted replies
    metrics: list[MetricRecord] = field(default_factory=list)  # of the accepted replies

    @property
    def max_epsilon(self) -> float | None:
        spent = [p["epsilon"] for _, p in self.privacy if "epsilon" in p]
        return max(spent) if spent else None


class RoundStrategy(Strategy):
    """A Flower strategy that also runs whole rounds for the server loop.

    Subclasses keep the round's :class:`RoundOutcome` in ``self.outcome`` (started by
    ``configure_train``), and checkpoint what a resumed run needs through
    ``state_dict``/``load_state_dict``.
    """

    outcome: RoundOutcome

    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord,
                    config: ConfigRecord, *, timeout: float | None,
                    timer: RoundTimer) -> RoundOutcome:
        """Sample, send the global adapter, wait for replies, validate and aggregate."""
        with timer.phase("train_exchange"):
            replies = grid.send_and_receive(
                messages=self.configure_train(server_round, arrays, config, grid),
                timeout=timeout)
        with timer.phase("aggregation"):
            new_arrays, metrics = self.aggregate_train(server_round, replies)
        self.outcome.arrays, self.outcome.train_metrics = new_arrays, metrics
        return self.outcome

    def evaluate_round(self, grid: Grid, server_round: int, arrays: ArrayRecord,
                       config: ConfigRecord, *, timeout: float | None,
                       timer: RoundTimer) -> MetricRecord | None:
        """Federated evaluation of ``arrays``; the replies' timings join the outcome's."""
        with timer.phase("eval_exchange"):
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(server_round, arrays, config, grid),
                timeout=timeout)
            return self.aggregate_evaluate(server_round, replies)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class WrappingStrategy(RoundStrategy):
    """A strategy around an inner one (a privacy or secure-aggregation layer, as Flower's DP
    wrappers are): the round's outcome, node identities, federated evaluation and the
    checkpoint are the inner strategy's unless a subclass says otherwise."""

    def __init__(self, strategy: RoundStrategy) -> None:
        self.strategy = strategy

    @property
    def outcome(self) -> RoundOutcome:  # type: ignore[override]
        return self.strategy.outcome

    def identify_nodes(self, grid: Grid, timeout: float | None = None) -> int:
        return self.strategy.identify_nodes(grid, timeout=timeout)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def public_node(self, node: int) -> int:
        return self.strategy.public_node(node)

    def state_dict(self) -> dict:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state)


CLIENT_PROCESS_DIED = ("the client's process died (killed, e.g. for memory, or crashed); a "
                       "fresh worker serves the next message")


def short_reason(reason: str, limit: int = 300) -> str:
    """An error reason without the traceback around it: Flower's simulation wraps a crashed
    ClientApp's exception in a Ray traceback ending in "Message: <the exception's text>"."""
    reason = str(reason)
    marker = "Message: "
    if any(m in reason for m in DIED_MARKERS):  # only this: Ray's text names the process,
        return CLIENT_PROCESS_DIED               # its host and the memory it held
    if marker in reason:
        reason = "client crashed: " + reason[reason.rindex(marker) + len(marker):]
    reason = " ".join(reason.split()).rstrip("'>\"")
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def weighted_metrics(metrics: list[MetricRecord], weights: list[int]) -> MetricRecord:
    """Example-weighted mean of every numeric metric; ``num-examples`` is summed."""
    total = float(sum(weights))
    keys = set().union(*(m.keys() for m in metrics)) - {"num-examples"}
    out: dict[str, float | int] = {"num-examples": int(total)}
    for key in sorted(keys):
        vals = [(float(m[key]), w) for m, w in zip(metrics, weights)
                if key in m and isinstance(m[key], (int, float)) and math.isfinite(float(m[key]))]
        wsum = sum(w for _, w in vals)
        if wsum > 0:
            out[key] = sum(v * w for v, w in vals) / wsum
    return MetricRecord(out)
