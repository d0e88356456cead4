"""Which nodes a round trains on: nodes ordered by the partition-id they tell (else by
node id) and sampled by position, so that a seeded run samples the same partitions every
time. A part of :class:`fedlora.app.server.strategy.LoraStrategy`, which holds ``rng``."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.protocol import CONFIG_KEY, IDENTITY_KEY

__all__ = ["NodeSampling"]

log = logging.getLogger("fedlora.server")


class NodeSampling:
    """Node order and sampling of :class:`fedlora.app.server.strategy.LoraStrategy`."""

    node_keys: dict[int, int]  # node id -> partition-id, from identify_nodes

    def identify_nodes(self, grid: Grid, timeout: float | None = None) -> int:
        """Ask every node for its identity (a query message) and order nodes by it.

        Flower's simulation gives nodes new random ids in every run; sampling positions in
        the id order would pick other partitions each run. Nodes that tell their
        ``partition-id`` are ordered by it, so a seeded run samples the same partitions
        every time, and a resumed one the partitions the uninterrupted run would. Nodes that
        do not answer (deployed sites, another ClientApp, a timeout) come after, by id.
        Returns the number of nodes identified.
        """
        nodes = sorted(grid.get_node_ids())
        msgs = [Message(content=RecordDict({CONFIG_KEY: ConfigRecord({"query": "identity"})}),
                        message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        keys: dict[int, int] = {}
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            if reply.has_error():
                continue
            record = reply.content.get(IDENTITY_KEY)
            if record is not None and "partition-id" in record:
                keys[reply.metadata.src_node_id] = int(record["partition-id"])
        self.node_keys = keys
        if keys:
            log.info("%d of %d nodes told their partition-id: sampling follows partition ids%s",
                     len(keys), len(nodes), "" if len(keys) == len(nodes)
                     else " (the others after them, by node id)")
        elif nodes:
            log.info("no node told a partition-id (deployed sites): sampling follows node ids")
        return len(keys)

    def ordered_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes in sampling order."""
        return self._ordered(grid.get_node_ids())

    def _ordered(self, nodes: Iterable[int]) -> list[int]:
        """Nodes in sampling order: by partition-id where known, then by node id."""
        keys = self.node_keys
        return sorted(nodes, key=lambda n: (0, keys[n], n) if n in keys else (1, 0, n))

    def _sample(self, grid: Grid, fraction: float, minimum: int, rng=None) -> list[int]:
        nodes = self._ordered(grid.get_node_ids())
        if not nodes:
            return []
        n = min(len(nodes), max(minimum, int(round(len(nodes) * fraction))))
        # Choose positions, not ids: node ids are uint64 and would lose bits as float/int64.
        picks = (rng or self.rng).choice(len(nodes), size=n, replace=False)
        return self._ordered(nodes[int(i)] for i in picks)
