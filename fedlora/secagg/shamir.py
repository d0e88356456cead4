"""t-of-n Shamir secret sharing of byte strings, over the prime field GF(2^521 - 1).

A secret of up to :data:`MAX_SECRET_BYTES` bytes is read as the integer
``int.from_bytes(b"\\x01" + secret)`` (the leading byte keeps leading zero bytes of the
secret), the constant term of a random polynomial of degree ``t - 1`` whose other
coefficients are uniform field elements drawn with :mod:`secrets`. Share ``i`` is the point
``(x_i, f(x_i))`` for a distinct non-zero ``x_i``. Any ``t`` shares determine ``f`` and so
the secret (Lagrange interpolation at 0); any ``t - 1`` shares are consistent with every
possible secret, each equally likely, so they reveal nothing about it.

Shares beyond the first ``t`` given to :func:`combine` are checked against the polynomial
the first ``t`` define: a corrupted or mismatched share raises rather than yielding a wrong
secret silently.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

__all__ = ["MAX_SECRET_BYTES", "PRIME", "SHARE_BYTES", "Share", "combine", "interpolate",
           "share_from_bytes", "share_to_bytes", "split"]

#: The field's modulus, the Mersenne prime 2^521 - 1.
PRIME = 2**521 - 1
#: Longest secret :func:`split` takes (its encoding must stay below :data:`PRIME`).
MAX_SECRET_BYTES = 64
#: Bytes of a share's y coordinate on the wire (big-endian).
SHARE_BYTES = 66

#: A share: the point (x, y) of the sharing polynomial, both field elements, x != 0.
Share = tuple[int, int]


def _encode(secret: bytes) -> int:
    if not isinstance(secret, bytes) or len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"a secret must be at most {MAX_SECRET_BYTES} bytes")
    return int.from_bytes(b"\x01" + secret, "big")


def _decode(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if not raw or raw[0] != 1 or len(raw) > MAX_SECRET_BYTES + 1:
        raise ValueError("the shares do not encode a secret (corrupted or mismatched shares)")
    return raw[1:]


def _check_xs(xs: Sequence[int], lowest: int = 1) -> None:
    seen: set[int] = set()
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, int) or not lowest <= x < PRIME:
            raise ValueError(f"a share's x must be an integer in [{lowest}, p), got {x!r}")
        if x in seen:
            raise ValueError(f"duplicate share x = {x}")
        seen.add(x)


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Shares of ``secret`` at the points ``xs``; any ``threshold`` of them reconstruct it."""
    _check_xs(xs)
    if isinstance(threshold, bool) or not isinstance(threshold, int) \
            or not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}] (the number of shares), "
                         f"got {threshold!r}")
    coefficients = [_encode(secret)] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def interpolate(points: Sequence[Share], x: int) -> int:
    """The value at ``x`` of the polynomial of degree < len(points) through ``points``."""
    _check_xs([px for px, _ in points], lowest=0)
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret behind ``shares`` (at least ``threshold`` of them, distinct x)."""
    if len(shares) < threshold:
        raise ValueError(f"too few shares: {len(shares)} given, {threshold} needed")
    _check_xs([x for x, _ in shares])
    base = list(shares[:threshold])
    for x, y in shares[threshold:]:
        if not 0 <= y < PRIME or interpolate(base, x) != y:
            raise ValueError(f"share x = {x} is inconsistent with the others")
    return _decode(interpolate(base, 0))


def share_to_bytes(y: int) -> bytes:
    """A share's y coordinate as :data:`SHARE_BYTES` big-endian bytes."""
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Inverse of :func:`share_to_bytes`; ``ValueError`` if not a field element."""
    if not isinstance(data, bytes) or len(data) != SHARE_BYTES:
        raise ValueError(f"a share must be {SHARE_BYTES} bytes")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ValueError("a share must be below the field's prime")
    return y
