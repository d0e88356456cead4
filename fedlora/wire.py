"""What crosses the wire: adapter tensors as a Flower ``ArrayRecord`` of raw bytes.

Each array travels as its raw little-endian, C-ordered bytes (``stype`` =
:data:`STYPE`), so the bytes of an array in a message are exactly
``numel x dtype size``: what the communication ledger measures is what the analytic
count predicts. ``wire-dtype`` float16/bfloat16 halves them; receivers always get
float32 back.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = ["STYPE", "WIRE_DTYPES", "to_record", "from_record", "array_bytes", "record_bytes"]

STYPE = "fedlora.raw-le"
WIRE_DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}


def _encode(arr: np.ndarray, wire_dtype: str) -> Array:
    a = np.ascontiguousarray(arr, dtype=np.float32)
    if wire_dtype == "float32":
        data = a.astype("<f4", copy=False).tobytes()
    elif wire_dtype == "float16":
        data = a.astype("<f2").tobytes()
    elif wire_dtype == "bfloat16":
        # numpy has no bfloat16: round in torch, ship the 16-bit patterns.
        data = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    else:
        raise ValueError(f"unknown wire dtype {wire_dtype!r} (known: {', '.join(WIRE_DTYPES)})")
    return Array(dtype=wire_dtype, shape=tuple(int(s) for s in a.shape), stype=STYPE, data=data)


def _decode(key: str, arr: Array) -> np.ndarray:
    if arr.stype != STYPE:
        # Also accept Flower's own numpy serialisation (e.g. from other tools).
        return np.asarray(arr.numpy(), dtype=np.float32)
    shape = tuple(arr.shape)
    size = WIRE_DTYPES.get(arr.dtype)
    if size is None:
        raise ValueError(f"array '{key}' has unknown wire dtype {arr.dtype!r}")
    expected = int(np.prod(shape, dtype=np.int64)) * size
    if len(arr.data) != expected:
        raise ValueError(f"array '{key}' holds {len(arr.data)} bytes, expected {expected} "
                         f"for {arr.dtype} {shape}")
    if arr.dtype == "float32":
        out = np.frombuffer(arr.data, dtype="<f4")
    elif arr.dtype == "float16":
        out = np.frombuffer(arr.data, dtype="<f2")
    else:
        bits = torch.from_numpy(np.frombuffer(arr.data, dtype="<i2").copy())
        out = bits.view(torch.bfloat16).to(torch.float32).numpy()
    return out.astype(np.float32).reshape(shape)


def to_record(state: Mapping[str, np.ndarray], wire_dtype: str = "float32") -> ArrayRecord:
    """Serialise ``{key: array}`` for transport in ``wire_dtype``."""
    return ArrayRecord({k: _encode(v, wire_dtype) for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Deserialise an ``ArrayRecord`` written by :func:`to_record` into float32 arrays."""
    return {k: _decode(k, a) for k, a in record.items()}


def array_bytes(arr: Array) -> int:
    """Payload bytes of one array as serialised in a message."""
    return len(arr.data)


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of all arrays of a record."""
    return sum(array_bytes(a) for a in record.values())
