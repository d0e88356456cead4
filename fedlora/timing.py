"""Where the seconds of a round go: the server's phases and the clients' own work.

The server times its phases (:meth:`RoundTimer.phase`): the training and evaluation
message exchanges (which contain the clients' work, Flower/Ray transport and waiting),
aggregation, the centralised evaluation, and writing checkpoint and results. Clients that
may say so (not under DP: timing is data-dependent) report their set-up, training and
evaluation seconds; the server sums them over the replies. Clients run in parallel, so
their sums are *busy* seconds: divided by the number of clients that ran at once they
give the part of an exchange they filled; the rest of the exchange is transport and waiting.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping

__all__ = ["PHASES", "RoundTimer", "CLIENT_TIMINGS"]

#: Server phases, in the order a round runs them.
PHASES = ("train_exchange", "aggregation", "eval_exchange", "central_eval", "writing")
#: Metric keys a client reports its seconds under, and the breakdown key of their sum.
CLIENT_TIMINGS = {"setup-seconds": "client_setup", "compute-seconds": "client_train",
                  "eval-seconds": "client_eval"}


class RoundTimer:
    """Seconds per phase of one round, plus the clients' reported busy seconds."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.client: dict[str, float] = dict.fromkeys(CLIENT_TIMINGS.values(), 0.0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown round phase {name!r} (known: {', '.join(PHASES)})")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def add_clients(self, metrics: Iterable[Mapping[str, object]]) -> None:
        """Add the seconds clients reported in their replies' metrics."""
        for m in metrics:
            for key, name in CLIENT_TIMINGS.items():
                value = m.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.client[name] += float(value)

    def breakdown(self) -> dict[str, float]:
        """Every phase in seconds, the clients' busy seconds, ``other`` (the round's wall
        time outside the timed phases) and ``total``."""
        total = time.perf_counter() - self.t0
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out.update({k: round(v, 3) for k, v in self.client.items()})
        out["other"] = round(max(0.0, total - sum(self.seconds.values())), 3)
        out["total"] = round(total, 3)
        return out

    @staticmethod
    def line(b: Mapping[str, float]) -> str:
        """One short log line: each phase's share of the round."""
        total = b["total"] or 1.0
        parts = [f"{k.replace('_', ' ')} {b[k]:.1f} s ({100 * b[k] / total:.0f}%)"
                 for k in (*PHASES, "other") if b.get(k)]
        busy = [f"{k.replace('client_', '')} {b[k]:.1f}" for k in CLIENT_TIMINGS.values()
                if b.get(k)]
        return " | ".join(parts) + (f" | clients busy (s): {', '.join(busy)}" if busy else "")
