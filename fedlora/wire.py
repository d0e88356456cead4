"""What crosses the wire: adapter tensors as a Flower ``ArrayRecord`` of raw bytes.

Each array travels as its raw little-endian, C-ordered bytes (``stype`` =
:data:`STYPE`), so the bytes of an array in a message are exactly
``numel x dtype size``: what the communication log measures is what the analytic
count predicts. ``wire-dtype`` float16/bfloat16 halves them; ``int8``/``int4`` quantise
block-wise with their scales in the same bytes (:mod:`fedlora.quantization`), optionally
with error feedback. Receivers always get float32 back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from .quantization import (
    QUANTIZED_DTYPES,
    ErrorFeedback,
    decode_bytes,
    encode_bytes,
    quantized_bytes,
)

if TYPE_CHECKING:
    from .run_config import RunConfig

__all__ = ["STYPE", "WIRE_DTYPES", "ALL_WIRE_DTYPES", "WireFormat", "to_record", "from_record",
           "array_bytes", "record_bytes", "encoded_bytes"]

STYPE = "fedlora.raw-le"
WIRE_DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}  # bytes per value
ALL_WIRE_DTYPES = (*WIRE_DTYPES, *QUANTIZED_DTYPES)


@dataclass(frozen=True)
class WireFormat:
    """How adapter tensors are serialised: ``dtype``; for int8/int4 also the block size,
    the rounding and whether the sender feeds its rounding error back."""

    dtype: str = "float32"
    block_size: int = 64
    stochastic: bool = False
    error_feedback: bool = True

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "WireFormat":
        return cls(dtype=cfg.wire_dtype, block_size=cfg.wire_block_size,
                   stochastic=cfg.wire_rounding == "stochastic",
                   error_feedback=cfg.wire_error_feedback)

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANTIZED_DTYPES

    @property
    def uses_feedback(self) -> bool:
        return self.quantized and self.error_feedback

    def feedback_for(self, method) -> bool:
        """Whether a sender of ``method``'s messages keeps a rounding residual: with error
        feedback on a quantised wire, unless the method's messages start over every round
        (``Method.wire_feedback``)."""
        return self.uses_feedback and bool(method.wire_feedback)


def _as_format(wire: "WireFormat | str") -> WireFormat:
    return wire if isinstance(wire, WireFormat) else WireFormat(dtype=wire)


def encoded_bytes(numel: int, dtype: str, block_size: int = 64) -> int:
    """Serialised bytes of an array of ``numel`` values in wire ``dtype``."""
    if dtype in QUANTIZED_DTYPES:
        return quantized_bytes(numel, dtype, block_size)
    return numel * WIRE_DTYPES[dtype]


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
        raise ValueError(f"unknown wire dtype {wire_dtype!r} (known: {', '.join(ALL_WIRE_DTYPES)})")
    return Array(dtype=wire_dtype, shape=tuple(int(s) for s in a.shape), stype=STYPE, data=data)


def _decode(key: str, arr: Array) -> np.ndarray:
    if arr.stype != STYPE:
        # Also accept Flower's own numpy serialisation (e.g. from other tools).
        try:
            return np.asarray(arr.numpy(), dtype=np.float32)
        except Exception as e:  # whatever a foreign serialisation raises: a bad array
            raise ValueError(f"array '{key}' cannot be read ({type(e).__name__}: {e})") from None
    shape = tuple(arr.shape)
    if arr.dtype in QUANTIZED_DTYPES:
        return decode_bytes(arr.data, arr.dtype, shape, key)
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


def to_record(state: Mapping[str, np.ndarray], wire: WireFormat | str = "float32", *,
              feedback: ErrorFeedback | None = None,
              rng: np.random.Generator | None = None,
              decoded: dict[str, np.ndarray] | None = None) -> ArrayRecord:
    """Serialise ``{key: array}`` for transport in ``wire`` (a format or a dtype name).

    Quantised formats: ``feedback`` (if given) is added before rounding and updated with
    what rounding left out; ``rng`` is used for stochastic rounding (else: a fresh one).
    ``decoded`` (if given) is filled with what a receiver decodes (:func:`from_record`).
    """
    wire = _as_format(wire)
    if not wire.quantized:
        record = ArrayRecord({k: _encode(v, wire.dtype) for k, v in state.items()})
        if decoded is not None:
            decoded.update(from_record(record))
        return record
    if wire.stochastic and rng is None:
        rng = np.random.default_rng()
    out = {}
    for k, v in state.items():
        target = feedback.target(k, v) if feedback is not None else np.asarray(v, np.float32)
        data, sent = encode_bytes(target, wire.dtype, wire.block_size,
                                  rng if wire.stochastic else None)
        if feedback is not None:
            feedback.keep(k, target, sent)
        if decoded is not None:
            decoded[k] = sent
        out[k] = Array(dtype=wire.dtype, shape=tuple(int(s) for s in np.shape(v)),
                       stype=STYPE, data=data)
    return ArrayRecord(out)


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Deserialise an ``ArrayRecord`` written by :func:`to_record` into float32 arrays."""
    return {k: _decode(k, a) for k, a in record.items()}


def array_bytes(arr: Array) -> int:
    """Payload bytes of one array as serialised in a message."""
    return len(arr.data)


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of all arrays of a record."""
    return sum(array_bytes(a) for a in record.values())
