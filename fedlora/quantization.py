"""Block-wise integer quantisation of adapter tensors for the wire, with error feedback.

An ``int8`` or ``int4`` array is cut, in C order, into blocks of ``block`` values. Each
block has one scale, its absolute maximum over the largest code (127 or 7), stored as a
float16 rounded *up* so that no value is clipped. Values are rounded to the nearest code or
stochastically (unbiased). Two 4-bit codes share a byte, the first in the low nibble.

The bytes of one array, in order:

==========  ======================================================
header      block size, uint32 little-endian (4 bytes)
scales      ``ceil(n / block)`` float16 little-endian
codes       int8: ``n`` bytes; int4: ``ceil(n / 2)`` bytes, code + 8
==========  ======================================================

so :func:`quantized_bytes` predicts every array's size from its shape alone.

:class:`ErrorFeedback` keeps, per array key, what rounding left out the last time and adds
it before the next quantisation (sigma-delta: over rounds, what arrives sums to what was
meant). It sees only the values being sent, so under DP it is post-processing of what the
mechanism released.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping

import numpy as np

__all__ = ["QUANTIZED_DTYPES", "ErrorFeedback", "quantized_bytes", "quantize", "dequantize",
           "encode_bytes", "decode_bytes", "header_block", "block_steps"]

QMAX: dict[str, int] = {"int8": 127, "int4": 7}
QUANTIZED_DTYPES = tuple(QMAX)
_HEADER = struct.Struct("<I")
_F16_MAX = float(np.finfo(np.float16).max)
_F16_TINY = np.float16(2.0 ** -24)  # the smallest positive (subnormal) float16


def quantized_bytes(numel: int, dtype: str, block: int) -> int:
    """Serialised size of an array of ``numel`` values: header + scales + codes."""
    codes = numel if dtype == "int8" else (numel + 1) // 2
    return _HEADER.size + 2 * math.ceil(numel / block) + codes


def _blocks(flat: np.ndarray, block: int) -> np.ndarray:
    """``flat`` zero-padded to whole blocks, one block per row."""
    padded = np.zeros(math.ceil(flat.size / block) * block, dtype=flat.dtype)
    padded[:flat.size] = flat
    return padded.reshape(-1, block)


def quantize(x: np.ndarray, dtype: str, block: int,
             rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(scales float16, codes int8)`` of ``x`` (any shape, read in C order).

    ``rng`` given: stochastic rounding (``floor(y + u)``, u uniform: unbiased); else nearest.
    """
    qmax = QMAX[dtype]
    flat = np.ascontiguousarray(x, dtype=np.float32).ravel()
    if not np.isfinite(flat).all():
        raise ValueError("cannot quantise non-finite values")
    n = flat.size
    padded = _blocks(flat, block)
    absmax = np.abs(padded).max(axis=1) if n else np.zeros(0, np.float32)
    ideal = absmax.astype(np.float64) / qmax
    if ideal.size and ideal.max() > _F16_MAX:
        raise ValueError(f"a value of magnitude {absmax.max():.4g} is too large for the "
                         f"{dtype} wire (float16 scales)")
    scales = ideal.astype(np.float16)
    low = scales.astype(np.float64) < ideal  # rounded down: step up one float16
    scales[low] = np.nextafter(scales[low], np.float16(np.inf))
    scales[(scales == 0) & (absmax > 0)] = _F16_TINY
    s = scales.astype(np.float32)[:, None]
    y = np.divide(padded, s, out=np.zeros_like(padded), where=s > 0)
    codes = np.floor(y + rng.random(y.shape, dtype=np.float32)) if rng is not None else np.rint(y)
    codes = np.clip(codes, -qmax, qmax).astype(np.int8).ravel()[:n]
    return scales, codes


def dequantize(scales: np.ndarray, codes: np.ndarray, block: int,
               shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of ``shape`` from :func:`quantize`'s output."""
    n = codes.size  # at most 2n values repeated, whatever block size a sender claims
    per_value = np.repeat(scales.astype(np.float32), min(block, max(n, 1)))[:n]
    return (codes.astype(np.float32) * per_value).reshape(shape)


def encode_bytes(x: np.ndarray, dtype: str, block: int,
                 rng: np.random.Generator | None = None) -> tuple[bytes, np.ndarray]:
    """(the serialised array, the float32 values a receiver will decode)."""
    scales, codes = quantize(x, dtype, block, rng)
    if dtype == "int8":
        body = codes.astype("<i1").tobytes()
    else:
        u = (codes.astype(np.int16) + 8).astype(np.uint8)
        if u.size % 2:
            u = np.append(u, np.uint8(8))
        body = (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()
    data = _HEADER.pack(block) + scales.astype("<f2").tobytes() + body
    return data, dequantize(scales, codes, block, np.shape(x))


def decode_bytes(data: bytes, dtype: str, shape: tuple[int, ...], key: str = "") -> np.ndarray:
    """float32 values of an array serialised by :func:`encode_bytes`; ValueError if its size
    does not match its shape."""
    n = int(np.prod(shape, dtype=np.int64))
    if len(data) < _HEADER.size:
        raise ValueError(f"array '{key}' holds {len(data)} bytes, too few for a {dtype} header")
    (block,) = _HEADER.unpack_from(data)
    if block < 1:
        raise ValueError(f"array '{key}' has block size 0")
    expected = quantized_bytes(n, dtype, block)
    if len(data) != expected:
        raise ValueError(f"array '{key}' holds {len(data)} bytes, expected {expected} for "
                         f"{dtype} {tuple(shape)} in blocks of {block}")
    blocks = math.ceil(n / block)
    start = _HEADER.size + 2 * blocks
    scales = np.frombuffer(data, dtype="<f2", count=blocks, offset=_HEADER.size)
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise ValueError(f"array '{key}' has non-finite or negative scales")
    if dtype == "int8":
        codes = np.frombuffer(data, dtype="<i1", offset=start).astype(np.int8)
    else:
        packed = np.frombuffer(data, dtype=np.uint8, offset=start)
        u = np.empty(packed.size * 2, dtype=np.uint8)
        u[0::2], u[1::2] = packed & 0x0F, packed >> 4
        if n % 2 and u[n] != 8:
            raise ValueError(f"array '{key}' has a padding nibble other than 8")
        codes = (u[:n].astype(np.int16) - 8).astype(np.int8)
    if (np.abs(codes.astype(np.int16)) > QMAX[dtype]).any():
        raise ValueError(f"array '{key}' has codes outside [-{QMAX[dtype]}, {QMAX[dtype]}]")
    return dequantize(scales, codes, block, tuple(shape))


def header_block(data: bytes) -> int:
    """The block size an int8/int4 array's header declares (0 if it has no header)."""
    return _HEADER.unpack_from(data)[0] if len(data) >= _HEADER.size else 0


def block_steps(values: np.ndarray, dtype: str, block: int) -> np.ndarray:
    """Per value, the rounding step of its block as a receiver sees it: the block's largest
    decoded magnitude over the largest code (the code of that value, by construction)."""
    flat = np.abs(np.asarray(values, dtype=np.float64)).ravel()
    if not flat.size:
        return np.zeros(np.shape(values))
    steps = _blocks(flat, block).max(axis=1) / QMAX[dtype]
    return np.repeat(steps, block)[:flat.size].reshape(np.shape(values))


class ErrorFeedback:
    """Per-key quantisation residuals, carried from one message to the next.

    When an array's shape changes (a rank that grew, FLoRA's stacked factors), the residual
    keeps its overlap with the new shape (the leading rows and columns) and starts at zero
    elsewhere.
    """

    def __init__(self, residuals: Mapping[str, np.ndarray] | None = None) -> None:
        self.residuals: dict[str, np.ndarray] = {
            k: np.asarray(v, dtype=np.float32) for k, v in (residuals or {}).items()}

    def target(self, key: str, x: np.ndarray) -> np.ndarray:
        """What to quantise: ``x`` plus the residual left from the last message."""
        x = np.asarray(x, dtype=np.float32)
        old = self.residuals.get(key)
        if old is None:
            return x
        if old.shape != x.shape:
            fitted = np.zeros_like(x)
            if old.ndim == x.ndim:
                overlap = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, x.shape))
                fitted[overlap] = old[overlap]
            old = fitted
        return x + old

    def keep(self, key: str, target: np.ndarray, sent: np.ndarray) -> None:
        """Remember what rounding ``target`` to ``sent`` left out."""
        self.residuals[key] = (np.asarray(target, np.float32) - sent).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return dict(self.residuals)
