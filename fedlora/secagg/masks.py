"""Vectors modulo 2^k and the masks that hide them.

Secure aggregation adds integer vectors in the ring Z_{2^k} (1 <= k <= :data:`MAX_BITS`),
held as numpy ``uint64`` arrays with every entry in [0, 2^k): additions wrap mod 2^64 and a
bit mask reduces the result mod 2^k (exact, since 2^k divides 2^64).

A mask is the output of a cryptographic pseudorandom generator: the ChaCha20 keystream
under a 32-byte seed used as the key (zero nonce: every seed is a fresh key used for one
expansion), read as little-endian 64-bit words and reduced mod 2^k. Each word is uniform on
[0, 2^64), so its reduction is uniform on [0, 2^k). Nothing here uses a statistical
generator (numpy's or :mod:`random`): masks must be unpredictable without the seed.

Sizes: a sum of ``sites`` values each in [0, max_value] fits k bits without wrapping when
``sites * max_value < 2^k`` (:func:`bits_for`). Signed values are stored in two's complement
(:func:`encode`) and a sum is read back by the centred lift (:func:`decode`): exact when the
true sum lies in [-2^(k-1), 2^(k-1)) (:func:`modulus_bits`, ``bits_for(..., signed=True)``).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from .crypto import KEY_BYTES

__all__ = ["MAX_BITS", "add", "bits_for", "check_vector", "decode", "encode", "keystream",
           "modulus_bits", "prg", "subtract", "zeros"]

#: Largest modulus exponent k (a decoded signed sum must fit numpy's int64).
MAX_BITS = 62
_ZERO_NONCE = bytes(16)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"modulus bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
    return bits


def _mask(bits: int) -> np.uint64:
    return np.uint64((1 << _check_bits(bits)) - 1)


def keystream(seed: bytes, num_bytes: int) -> bytes:
    """``num_bytes`` of ChaCha20 keystream under the 32-byte ``seed``."""
    if not isinstance(seed, bytes) or len(seed) != KEY_BYTES:
        raise ValueError(f"a PRG seed must be {KEY_BYTES} bytes")
    encryptor = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor()
    return encryptor.update(bytes(num_bytes)) + encryptor.finalize()


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """The mask of ``length`` uniform entries in [0, 2^bits) expanded from ``seed``."""
    words = np.frombuffer(keystream(seed, 8 * length), dtype="<u8")
    return words.astype(np.uint64) & _mask(bits)


def zeros(length: int) -> np.ndarray:
    """The zero vector of the ring."""
    return np.zeros(length, dtype=np.uint64)


def add(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """``(a + b) mod 2^bits``."""
    return (a + b) & _mask(bits)


def subtract(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """``(a - b) mod 2^bits``."""
    return (a - b) & _mask(bits)


def check_vector(vector: object, length: int, bits: int) -> np.ndarray:
    """``vector`` as a uint64 array of ``length`` entries in [0, 2^bits), or ``ValueError``."""
    array = np.asarray(vector)
    if array.shape != (length,) or array.dtype.kind not in "iu":
        raise ValueError(f"expected an integer vector of length {length}, got "
                         f"shape {array.shape} and dtype {array.dtype}")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= 1 << _check_bits(bits)):
        raise ValueError(f"vector entries must lie in [0, 2^{bits})")
    return array.astype(np.uint64)


def encode(values: object, bits: int) -> np.ndarray:
    """Signed integers in [-2^(bits-1), 2^(bits-1)) as ring elements (two's complement)."""
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise ValueError(f"expected integers, got dtype {array.dtype}")
    half = 1 << (_check_bits(bits) - 1)
    if array.size and (int(array.min()) < -half or int(array.max()) >= half):
        raise ValueError(f"values must lie in [-2^{bits - 1}, 2^{bits - 1}) to encode "
                         f"in {bits} bits")
    return array.astype(np.int64).astype(np.uint64) & _mask(bits)


def decode(vector: np.ndarray, bits: int) -> np.ndarray:
    """Ring elements back to signed int64 by the centred lift (inverse of :func:`encode`)."""
    values = (np.asarray(vector, dtype=np.uint64) & _mask(bits)).astype(np.int64)
    half = 1 << (bits - 1)
    return np.where(values >= half, values - (1 << bits), values)


def modulus_bits(max_abs_sum: int) -> int:
    """Smallest k such that every signed sum in [-max_abs_sum, max_abs_sum] decodes exactly."""
    if isinstance(max_abs_sum, bool) or not isinstance(max_abs_sum, int) or max_abs_sum < 0:
        raise ValueError(f"max_abs_sum must be a non-negative integer, got {max_abs_sum!r}")
    return _check_bits(max_abs_sum.bit_length() + 1)


def bits_for(sites: int, max_value: int, *, signed: bool = False) -> int:
    """Smallest k such that a sum of ``sites`` values cannot wrap modulo 2^k.

    Unsigned: each value in [0, max_value], sums up to ``sites * max_value`` < 2^k.
    Signed: each value in [-max_value, max_value], decoded with :func:`decode`.
    """
    for name, value in (("sites", sites), ("max_value", max_value)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if signed:
        return modulus_bits(sites * max_value)
    return _check_bits(max(1, (sites * max_value).bit_length()))
