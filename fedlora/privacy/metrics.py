"""Privacy values on their way out: what a site may release, and one name per value.

A client's ledger and the server's user-level ledger report their spend as values named
by :data:`VALUES` (``epsilon``, ``noise-multiplier``, ...). A client sends them as metrics
prefixed ``dp-`` (:func:`to_metrics`); the server reads them back (:func:`from_metrics`)
and writes one ``privacy.csv`` row per node and round (:func:`privacy_row`, columns
:data:`PRIVACY_COLUMNS`). This module is the only place those names change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PREFIX", "PRIVACY_COLUMNS", "RELEASED_TRAIN_METRICS", "VALUES", "from_metrics",
           "privacy_row", "released_metrics", "to_metrics"]

#: Metric-name prefix of a privacy value in a client's reply.
PREFIX = "dp-"
#: Each privacy value's name in a ledger's report and its privacy.csv column.
VALUES: dict[str, str] = {
    "mode": "mode", "noise-multiplier": "noise_multiplier", "sample-rate": "sample_rate",
    "steps": "steps", "epsilon": "epsilon", "delta": "delta",
    "target-epsilon": "target_epsilon",
}
PRIVACY_COLUMNS: tuple[str, ...] = ("round", "node", *VALUES.values())

#: What a client's training reply may carry under any DP mode, besides the (noised)
#: adapter: ``num-examples`` (the site's noised count, or 1: :mod:`fedlora.privacy.count`),
#: ``train-steps`` (the configured local steps) and the ``dp-*`` accounting values
#: (functions of the plan, the released count and the rounds taken part in).
RELEASED_TRAIN_METRICS: frozenset[str] = frozenset({"num-examples", "train-steps"})


def released_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a client's metrics that may leave a site (or the server) under DP."""
    return {k: v for k, v in metrics.items()
            if k in RELEASED_TRAIN_METRICS or k.startswith(PREFIX)}


def to_metrics(values: Mapping[str, Any], *, numeric_only: bool = False) -> dict[str, Any]:
    """A ledger's values as reply metrics (``dp-epsilon``, ...)."""
    return {PREFIX + k: v for k, v in values.items()
            if not (numeric_only and isinstance(v, str))}


def from_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The privacy values in a reply's metrics, by their ledger names."""
    return {k[len(PREFIX):]: v for k, v in metrics.items() if k.startswith(PREFIX)}


def privacy_row(server_round: int, node: int | str, values: Mapping[str, Any],
                default_mode: str) -> dict[str, Any]:
    """One privacy.csv row from a ledger's values."""
    row: dict[str, Any] = {"round": server_round, "node": node}
    for name, column in VALUES.items():
        row[column] = values.get(name)
    row["mode"] = values.get("mode", default_mode)
    return row
