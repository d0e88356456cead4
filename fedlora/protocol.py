"""The message protocol between fedlora's ServerApp and ClientApp.

Server -> client: ``{"lora": ArrayRecord, "config": ConfigRecord}``.
Client -> server: ``{"lora": ArrayRecord (train only), "metrics": MetricRecord,
"status": ConfigRecord}``; ``status`` is ``ok`` or ``could-not-train`` with a
``reason`` the server logs. Only adapter tensors travel in ``lora``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

if TYPE_CHECKING:
    from .run_config import RunConfig

__all__ = ["LORA_KEY", "CONFIG_KEY", "METRICS_KEY", "STATUS_KEY", "IDENTITY_KEY", "NodeInfo",
           "could_not_train", "identity_reply", "with_overrides"]

LORA_KEY = "lora"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
STATUS_KEY = "status"
IDENTITY_KEY = "identity"  # a query reply: a simulated node's partition-id, nothing else
STATUS_OK = "ok"
STATUS_COULD_NOT_TRAIN = "could-not-train"


STATUS_BUDGET_EXHAUSTED = "budget-exhausted"


def could_not_train(
    reason: str, status: str = STATUS_COULD_NOT_TRAIN, metrics: Mapping[str, Any] | None = None
) -> RecordDict:
    """A reply saying this site did not take part, and why."""
    return RecordDict(
        {
            METRICS_KEY: MetricRecord({"num-examples": 0, **dict(metrics or {})}),
            STATUS_KEY: ConfigRecord({"status": status, "reason": reason[:2000]}),
        }
    )


@dataclass(frozen=True)
class NodeInfo:
    """What a node's node-config says about it."""

    partition_id: int | None
    num_partitions: int | None
    data_path: str | None
    lora_rank: int | None
    privacy_state_path: str | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], cfg: RunConfig) -> NodeInfo:
        pid = node_config.get("partition-id")
        nparts = cfg.num_partitions or node_config.get("num-partitions")
        rank = node_config.get("lora-rank")
        if rank is not None and (isinstance(rank, bool) or int(rank) < 1):
            raise ValueError(f"node-config key 'lora-rank' has bad value {rank!r}: expected >= 1")
        return cls(
            partition_id=None if pid is None else int(pid),
            num_partitions=None if nparts is None else int(nparts),
            data_path=str(node_config["data-path"]) if node_config.get("data-path") else None,
            lora_rank=None if rank is None else int(rank),
            privacy_state_path=(str(node_config["privacy-state-path"])
                                if node_config.get("privacy-state-path") else None),
        )


def with_overrides(context: Context, overrides: Mapping[str, Any] | None) -> Context:
    """``context`` with ``overrides`` merged over its run-config (in-process runs and tests).

    Flower forbids changing a context's run-config, so this is a new Context that shares
    the node-config and the persistent ``state`` of the original.
    """
    if not overrides:
        return context
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=context.state,
        run_config={**dict(context.run_config), **dict(overrides)},
    )


def identity_reply(node_config: Mapping[str, Any]) -> RecordDict:
    """What a node answers the server's identity query: its simulation ``partition-id``
    (stable across runs, unlike Flower's node ids) when it has one, else nothing. Never
    anything about its data."""
    pid = node_config.get("partition-id")
    record = {} if pid is None else {"partition-id": int(pid)}
    return RecordDict({IDENTITY_KEY: ConfigRecord(record)})
