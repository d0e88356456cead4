"""Runs one round of secure aggregation in-process: the server and the clients as objects,
messages as plain dicts passed between them.

This is the reference for how the stages chain (what a transport such as Flower's messages
has to carry) and the harness of the tests. Dropouts are modelled by clients that stop
answering from a given stage on; a client that refuses a stage
(:class:`~fedlora.secagg.common.ProtocolError`) is treated as dropped from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from .client import SecAggClient
from .common import ProtocolError, RoundConfig
from .server import Aggregate, SecAggServer

__all__ = ["STAGES", "Tamper", "run_local_round"]

#: The client stages, in order (names of :class:`SecAggClient`'s methods).
STAGES = ("setup", "advertise", "share_keys", "masked_input", "consistency", "unmask")

#: Called as ``tamper(stage, messages)`` with the server's messages of a stage, it returns
#: the messages to deliver (a test's stand-in for a dishonest server).
Tamper = Callable[[str, dict[int, dict[str, Any]]], dict[int, dict[str, Any]]]


def run_local_round(config: RoundConfig, inputs: Mapping[int, np.ndarray], *,
                    dropouts: Mapping[str, Iterable[int]] | None = None,
                    clients: Mapping[int, SecAggClient] | None = None,
                    tamper: Tamper | None = None,
                    refusals: dict[int, ProtocolError] | None = None) -> Aggregate:
    """One round over ``inputs`` (node id -> vector in [0, 2^bits)); returns the aggregate.

    ``dropouts[stage]`` lists clients that stop answering from that stage on. Clients that
    refuse a stage are recorded in ``refusals`` (when given). Raises
    :class:`~fedlora.secagg.common.RoundAborted` when the server cannot finish.
    """
    dropouts = dropouts or {}
    unknown = set(dropouts) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; stages are {STAGES}")
    if clients is None:
        clients = {u: SecAggClient(u) for u in config.cohort}
    refused = refusals if refusals is not None else {}
    gone: set[int] = set()

    def deliver(stage: str, messages: dict[int, dict[str, Any]]) -> dict[int, Any]:
        gone.update(dropouts.get(stage, ()))
        if tamper is not None:
            messages = tamper(stage, messages)
        replies = {}
        for u, message in messages.items():
            if u in gone:
                continue
            method = getattr(clients[u], stage)
            try:
                replies[u] = (method(message, inputs[u]) if stage == "masked_input"
                              else method(message))
            except ProtocolError as exc:
                refused[u] = exc
                gone.add(u)
        return replies

    server = SecAggServer(config)
    messages = server.collect_commitments(deliver("setup", server.setup()))
    messages = server.collect_keys(deliver("advertise", messages))
    messages = server.collect_shares(deliver("share_keys", messages))
    messages = server.collect_masked(deliver("masked_input", messages))
    messages = server.collect_signatures(deliver("consistency", messages))
    return server.aggregate(deliver("unmask", messages))
