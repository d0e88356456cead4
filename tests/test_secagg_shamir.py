"""Shamir secret sharing (fedlora.secagg.shamir)."""

from __future__ import annotations

import itertools
import os

import pytest

from fedlora.secagg.shamir import (
    PRIME,
    combine,
    interpolate,
    share_from_bytes,
    share_to_bytes,
    split,
)


def test_any_t_of_n_shares_reconstruct():
    secret = os.urandom(32)
    shares = split(secret, 3, [1, 2, 3, 4, 5])
    for subset in itertools.combinations(shares, 3):
        assert combine(list(subset), 3) == secret
        assert combine(list(reversed(subset)), 3) == secret
    assert combine(shares, 3) == secret  # extra shares are checked, and agree


def test_secrets_with_leading_zeros_and_empty_survive():
    for secret in (bytes(32), b"\x00\x00\x01", b"", b"\xff" * 64):
        assert combine(split(secret, 2, [7, 9, 11])[1:], 2) == secret


def test_too_few_duplicate_or_bad_shares_raise():
    shares = split(b"secret", 3, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="too few shares"):
        combine(shares[:2], 3)
    with pytest.raises(ValueError, match="duplicate"):
        combine([shares[0], shares[0], shares[1]], 3)
    with pytest.raises(ValueError, match="duplicate"):
        split(b"secret", 2, [1, 2, 2])
    with pytest.raises(ValueError, match="x must be"):
        split(b"secret", 2, [0, 1])
    with pytest.raises(ValueError, match="threshold"):
        split(b"secret", 4, [1, 2, 3])
    with pytest.raises(ValueError, match="at most"):
        split(bytes(65), 2, [1, 2])
    x, y = shares[3]
    with pytest.raises(ValueError, match="inconsistent"):
        combine(shares[:3] + [(x, (y + 1) % PRIME)], 3)


def test_t_minus_one_shares_fit_every_secret():
    """Any candidate secret completes t - 1 shares to a valid sharing (perfect hiding)."""
    t = 4
    shares = split(os.urandom(32), t, [1, 2, 3, 4, 5, 6])
    seen = shares[: t - 1]
    for candidate in (bytes(32), b"\xff" * 32, os.urandom(32)):
        encoded = int.from_bytes(b"\x01" + candidate, "big")
        # The polynomial through (0, candidate) and the t - 1 seen shares ...
        completion = [(0, encoded)] + seen
        fresh = (6, interpolate(completion, 6))
        # ... gives a t-th share with which the seen shares reconstruct the candidate.
        assert combine(seen + [fresh], t) == candidate


def test_sharings_use_fresh_coefficients():
    secret = os.urandom(32)
    first, second = split(secret, 3, [1, 2, 3]), split(secret, 3, [1, 2, 3])
    assert all(a[1] != b[1] for a, b in zip(first, second, strict=True))
    assert combine(first, 3) == combine(second, 3) == secret


def test_share_bytes_round_trip():
    (x, y), = split(os.urandom(32), 1, [5])
    assert share_from_bytes(share_to_bytes(y)) == y
    with pytest.raises(ValueError):
        share_from_bytes(share_to_bytes(PRIME))
    with pytest.raises(ValueError):
        share_from_bytes(b"\x00" * 10)
