"""Vectors mod 2^k, the ChaCha20 mask generator and sizes (fedlora.secagg.masks)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

import fedlora.secagg as secagg
from fedlora.secagg.masks import (
    add,
    bits_for,
    decode,
    encode,
    keystream,
    modulus_bits,
    prg,
    subtract,
)

#: chi-square critical value for 15 degrees of freedom at p = 1e-6.
CHI2_15 = 50.5


def chi_square_top_bits(values: np.ndarray, bits: int, top: int = 4) -> float:
    counts = np.bincount((values >> np.uint64(bits - top)).astype(np.int64),
                         minlength=2**top)
    assert counts.size == 2**top  # nothing at or above 2^bits
    expected = values.size / 2**top
    return float(((counts - expected) ** 2 / expected).sum())


def test_keystream_is_chacha20():
    """RFC 7539 A.1 test vector 1: all-zero key, nonce and counter."""
    assert keystream(bytes(32), 64)[:32].hex() == (
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7")


def test_same_seed_same_mask_different_seed_different():
    seed = os.urandom(32)
    assert np.array_equal(prg(seed, 1000, 40), prg(seed, 1000, 40))
    assert np.array_equal(prg(seed, 10, 40), prg(seed, 1000, 40)[:10])
    other = prg(os.urandom(32), 1000, 40)
    assert np.mean(other == prg(seed, 1000, 40)) < 0.01
    with pytest.raises(ValueError):
        prg(b"short", 10, 40)


@pytest.mark.parametrize("bits", [62, 33, 8])
def test_masks_look_uniform(bits):
    mask = prg(os.urandom(32), 100_000, bits)
    assert mask.dtype == np.uint64 and int(mask.max()) < 2**bits
    assert chi_square_top_bits(mask, bits) < CHI2_15
    scaled = mask.astype(np.float64) / 2**bits  # ~ uniform on [0, 1)
    stderr = (1 / 12 / mask.size) ** 0.5
    assert abs(scaled.mean() - 0.5) < 6 * stderr
    assert abs(scaled.var() - 1 / 12) < 0.01


def test_no_statistical_generators_in_the_package():
    source = Path(secagg.__file__).parent
    pattern = re.compile(r"np\.random|numpy\.random|^\s*(import|from) random\b|RandomState|"
                         r"default_rng|MT19937|random\.seed", re.MULTILINE)
    files = sorted(source.glob("*.py"))
    assert len(files) >= 6
    for path in files:
        assert not pattern.search(path.read_text()), path.name


def test_ring_arithmetic_wraps_mod_2_to_k():
    bits = 10
    a = np.array([1000, 1023, 0], dtype=np.uint64)
    b = np.array([100, 1, 1], dtype=np.uint64)
    assert add(a, b, bits).tolist() == [(1100) % 1024, 0, 1]
    assert subtract(b, a, bits).tolist() == [(100 - 1000) % 1024, 2, 1]
    assert add(subtract(a, b, bits), b, bits).tolist() == a.tolist()


def test_encode_decode_signed():
    values = np.array([-8, -1, 0, 1, 7])
    encoded = encode(values, 4)
    assert encoded.tolist() == [8, 15, 0, 1, 7]
    assert decode(encoded, 4).tolist() == values.tolist()
    with pytest.raises(ValueError):
        encode(np.array([8]), 4)
    with pytest.raises(ValueError):
        encode(np.array([-9]), 4)
    big = np.array([-(2**61), 2**61 - 1])
    assert decode(encode(big, 62), 62).tolist() == big.tolist()


def total(vectors, bits):
    out = np.zeros(vectors[0].shape, dtype=np.uint64)
    for v in vectors:
        out = add(out, v, bits)
    return out


@pytest.mark.parametrize("sites,max_value", [(10, 1000), (7, 2**20 - 1), (1000, 2**40)])
def test_bits_for_unsigned_is_tight(sites, max_value):
    bits = bits_for(sites, max_value)
    worst = [np.array([max_value], dtype=np.uint64)] * sites
    assert int(total(worst, bits)[0]) == sites * max_value
    assert int(total(worst, bits - 1)[0]) != sites * max_value  # one bit fewer wraps


@pytest.mark.parametrize("sites,max_value", [(10, 1000), (12, 2**16), (3, 1)])
def test_bits_for_signed_is_tight(sites, max_value):
    bits = bits_for(sites, max_value, signed=True)
    for sign in (1, -1):
        worst = [encode(np.array([sign * max_value]), bits)] * sites
        assert int(decode(total(worst, bits), bits)[0]) == sign * sites * max_value
    smaller = bits - 1
    worst = [np.array([max_value], dtype=np.uint64)] * sites  # valid ring elements
    assert int(decode(total(worst, smaller), smaller)[0]) != sites * max_value


def test_bits_for_is_minimal_on_small_cases():
    for sites in range(1, 6):
        for max_value in range(1, 20):
            s = sites * max_value
            assert bits_for(sites, max_value) == min(k for k in range(1, 63) if s < 2**k)
            assert modulus_bits(s) == min(k for k in range(1, 63) if s < 2 ** (k - 1))


def test_sizes_out_of_range_raise():
    with pytest.raises(ValueError):
        bits_for(2**40, 2**40)
    with pytest.raises(ValueError):
        bits_for(-1, 3)
    with pytest.raises(ValueError):
        prg(os.urandom(32), 4, 63)
