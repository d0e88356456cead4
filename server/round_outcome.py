"""What one round did with its replies, and the metrics it reports from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flwr.app import MetricRecord

__all__ = ["RoundOutcome", "short_reason", "weighted_metrics"]


@dataclass
class RoundOutcome:
    """What happened to the replies of one round (for metrics and logs)."""

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


def short_reason(reason: str, limit: int = 300) -> str:
    """An error reason without the traceback around it: Flower's simulation wraps a crashed
    ClientApp's exception in a Ray traceback ending in "Message: <the exception's text>"."""
    reason = str(reason)
    marker = "Message: "
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
