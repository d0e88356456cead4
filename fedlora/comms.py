"""Communication log: the bytes of every message, by round, node, direction and kind."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .adapter_families import SENT_SUFFIXES
from .wire import ALL_WIRE_DTYPES, array_bytes, encoded_bytes

__all__ = ["CommsEntry", "CommsLog", "analytic_record_bytes"]

COLUMNS = ("round", "node", "direction", "kind", "bytes", "analytic_bytes", "factor_bytes",
           "head_bytes", "num_arrays", "wire_dtype", "keys", "array_bytes")


def _predicted_bytes(numel: int, dtype: str, block_size: int) -> int:
    if dtype in ALL_WIRE_DTYPES:
        return encoded_bytes(numel, dtype, block_size)
    try:
        return numel * np.dtype(dtype).itemsize  # Flower's own numpy arrays
    except TypeError:
        return 0  # no prediction for an unknown dtype: measured != analytic flags it


def analytic_record_bytes(record: Mapping[str, Any], block_size: int = 64) -> tuple[int, int]:
    """(factor bytes, head bytes) predicted from shapes, the wire dtype and (for int8/int4)
    the run's block size alone.

    Factors (the adapter family's own tensors: for LoRA, sum over modules of
    rank x (d_in + d_out); DoRA adds its magnitudes, VeRA has only its two vectors per layer):
    element count x dtype size; the head: its element count x dtype size. Quantised: values, plus one float16 scale per block,
    plus a 4-byte header per array.
    """
    factor = head = 0
    for key, arr in record.items():
        n = _predicted_bytes(int(np.prod(arr.shape, dtype=np.int64)), arr.dtype, block_size)
        if key.endswith(SENT_SUFFIXES):
            factor += n
        else:
            head += n
    return factor, head


@dataclass(frozen=True)
class CommsEntry:
    round: int
    node: int
    direction: str  # "up" (client -> server) or "down"
    kind: str  # "train" or "evaluate"
    bytes: int  # measured: payload bytes of the arrays as serialised in the message
    analytic_bytes: int
    factor_bytes: int
    head_bytes: int
    num_arrays: int
    wire_dtype: str
    keys: str  # ';'-joined array keys
    array_bytes: str  # ';'-joined serialised bytes of each array, in the order of ``keys``


class CommsLog:
    """Collects one :class:`CommsEntry` per message and summarises them."""

    def __init__(self, full_model_bytes: int = 0, block_size: int = 64) -> None:
        self.entries: list[CommsEntry] = []
        self.full_model_bytes = int(full_model_bytes)
        self.block_size = int(block_size)

    def record(self, server_round: int, node: int, direction: str, kind: str, record) -> CommsEntry:
        factor, head = analytic_record_bytes(record, self.block_size)
        dtypes = sorted({a.dtype for a in record.values()})
        entry = CommsEntry(
            round=int(server_round),
            node=int(node),
            direction=direction,
            kind=str(kind).split(".")[-1],
            bytes=sum(array_bytes(a) for a in record.values()),
            analytic_bytes=factor + head,
            factor_bytes=factor,
            head_bytes=head,
            num_arrays=len(record),
            wire_dtype=",".join(dtypes),
            keys=";".join(sorted(record.keys())),
            array_bytes=";".join(str(array_bytes(record[k])) for k in sorted(record.keys())),
        )
        self.entries.append(entry)
        return entry

    def record_bytes(self, server_round: int, node: int, direction: str, kind: str,
                     nbytes: int, analytic: int, keys: str = "") -> CommsEntry:
        """A message that is not adapter tensors (a secure aggregation stage): its bytes as
        measured, and as its formula predicts them (:mod:`fedlora.secagg_bytes`)."""
        entry = CommsEntry(round=int(server_round), node=int(node), direction=direction,
                           kind=str(kind).split(".")[-1], bytes=int(nbytes),
                           analytic_bytes=int(analytic), factor_bytes=0, head_bytes=0,
                           num_arrays=0, wire_dtype="", keys=keys, array_bytes="")
        self.entries.append(entry)
        return entry

    def forget(self, server_round: int, nodes: set[int], direction: str, kind: str) -> None:
        """Drop the entries of messages prepared for ``nodes`` but never sent to them."""
        kind = str(kind).split(".")[-1]
        self.entries = [e for e in self.entries if not (
            e.round == server_round and e.node in nodes and e.direction == direction
            and e.kind == kind)]

    def restore(self, rows: list[Mapping[str, Any]]) -> None:
        """Continue from the rows of an earlier :meth:`rows` (a resumed run)."""
        names = {f.name for f in fields(CommsEntry)}
        self.entries = [CommsEntry(**{k: v for k, v in r.items() if k in names}) for r in rows]

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.entries]

    def round_totals(self, server_round: int) -> dict[str, int]:
        up = sum(e.bytes for e in self.entries if e.round == server_round and e.direction == "up")
        down = sum(e.bytes for e in self.entries
                   if e.round == server_round and e.direction == "down")
        return {"up": up, "down": down}

    def summary(self) -> dict[str, Any]:
        """Totals per direction, per client and per round, and the ratio to full fine-tuning."""
        per_dir: dict[str, int] = defaultdict(int)
        per_node: dict[int, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
        per_round: dict[int, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
        up_train = [e for e in self.entries if e.direction == "up"
                    and e.kind in ("train", "secagg_masked_input")]  # a client's update
        for e in self.entries:
            per_dir[e.direction] += e.bytes
            per_node[e.node][e.direction] += e.bytes
            per_round[e.round][e.direction] += e.bytes
        per_msg = up_train[0].bytes if up_train else 0
        out: dict[str, Any] = {
            "total_bytes": {"up": per_dir.get("up", 0), "down": per_dir.get("down", 0)},
            "messages": len(self.entries),
            "bytes_per_client_update": per_msg,
            "full_model_bytes": self.full_model_bytes,
            "ratio_update_to_full_model": (per_msg / self.full_model_bytes
                                           if self.full_model_bytes and per_msg else None),
            "measured_equals_analytic": all(e.bytes == e.analytic_bytes for e in self.entries),
            "per_round": {str(r): v for r, v in sorted(per_round.items())},
            "per_node": {str(n): v for n, v in sorted(per_node.items())},
        }
        return out
