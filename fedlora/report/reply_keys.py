"""The audit of client replies: which array keys left the clients."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from ..adapter_families import SENT_SUFFIXES

#: What an adapter family sends (LoRA's factors, DoRA's magnitude, VeRA's vectors).
FACTOR_SUFFIXES = SENT_SUFFIXES
HEAD_MODULES = ("classifier", "score", "classification_head")


def is_head_key(key: str) -> bool:
    """True for a classification-head tensor key (``...classifier.weight``, ``...score.bias``)."""
    parts = key.split(".")
    return parts[-1] in ("weight", "bias") and any(p in HEAD_MODULES for p in parts[:-1])


def audit_reply_keys(rows: Iterable[Mapping[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Keys in client replies (``direction == "up"``) that are neither an adapter family's
    tensors nor head.

    Returns each such key with the (round, node) pairs of the replies that carried it.
    """
    found: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in rows:
        if row.get("direction") != "up":
            continue
        for key in filter(None, (row.get("keys") or "").split(";")):
            if not key.endswith(FACTOR_SUFFIXES) and not is_head_key(key):
                found[key].append((str(row.get("round")), str(row.get("node"))))
    return dict(found)


def _count_reply_keys(rows: Iterable[Mapping[str, str]]) -> tuple[int, int]:
    """(replies, distinct keys) among the client replies of comms.csv."""
    replies, keys = 0, set()
    for row in rows:
        if row.get("direction") == "up":
            replies += 1
            keys.update(filter(None, (row.get("keys") or "").split(";")))
    return replies, len(keys)

