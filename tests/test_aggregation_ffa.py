"""FFA: frozen, shared A factors make the mean of the B factors exact."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedlora.aggregation import (
    LoraFactors,
    aggregate,
    product_error,
)

from .test_aggregation import PROPERTY, dense, probabilities, rel_err

# ----------------------------------------------------------------------------- ffa


def _ffa_updates(seed: int, ranks, alphas, send_A: Sequence[bool], d_out=6, d_in=5):
    rng = np.random.default_rng(seed)
    shared = {n: rng.standard_normal((ranks[0], d_in)) for n in ("q", "v")}
    updates = []
    for r, alpha, send in zip(ranks, alphas, send_A):
        updates.append(
            {
                n: LoraFactors(A=shared[n].copy() if send else None, B=rng.standard_normal((d_out, r)), scale=alpha / r)
                for n in shared
            }
        )
    return updates, shared


@PROPERTY
@given(
    seed=st.integers(0, 2**31 - 1),
    alphas=st.lists(st.sampled_from([1.0, 4.0, 16.0, 32.0]), min_size=3, max_size=3),
    weights=st.lists(st.integers(1, 50), min_size=3, max_size=3),
    send_A=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_ffa_exact_when_A_agree(seed, alphas, weights, send_A):
    updates, shared = _ffa_updates(seed, [4, 4, 4], alphas, send_A)
    out = aggregate("ffa", updates, weights, shared_A=shared)
    p = probabilities(weights)
    for name, f in out.items():
        exact = sum(pk * c[name].scale * c[name].B @ shared[name] for pk, c in zip(p, updates))
        np.testing.assert_array_equal(f.A, shared[name])
        assert f.scale == pytest.approx(float(np.sum(p * np.asarray(alphas))) / 4)
        assert rel_err(exact, dense(f)) <= 1e-12
        assert product_error(updates, weights, out, shared_A=shared)[name] <= 1e-12


def test_ffa_uses_client_or_previous_A():
    updates, shared = _ffa_updates(1, [3, 3], [8.0, 8.0], [True, False])
    out = aggregate("ffa", updates, [1, 1])  # A taken from client 0
    np.testing.assert_array_equal(out["q"].A, shared["q"])
    updates, shared = _ffa_updates(1, [3, 3], [8.0, 8.0], [False, False])
    out2 = aggregate("ffa", updates, [1, 1], previous=out)
    np.testing.assert_array_equal(out2["q"].A, shared["q"])
    with pytest.raises(ValueError, match="no frozen A"):
        aggregate("ffa", updates, [1, 1])


def test_ffa_raises_when_A_differ_or_ranks_differ():
    updates, shared = _ffa_updates(2, [3, 3, 3], [8.0, 8.0, 8.0], [True, True, True])
    bad = dict(updates[1])
    bad["v"] = LoraFactors(A=shared["v"] + 1e-2, B=bad["v"].B, scale=bad["v"].scale)
    updates[1] = bad
    with pytest.raises(ValueError, match=r"client 1, module 'v'.*differs"):
        aggregate("ffa", updates, [1, 1, 1], shared_A=shared)
    # check_frozen=False ignores client A's and uses the shared one.
    out = aggregate("ffa", updates, [1, 1, 1], shared_A=shared, check_frozen=False)
    np.testing.assert_array_equal(out["v"].A, shared["v"])
    updates, shared = _ffa_updates(2, [3, 3], [8.0, 8.0], [False, False])
    updates[1] = {n: LoraFactors(A=None, B=np.ones((6, 2)), scale=4.0) for n in ("q", "v")}
    with pytest.raises(ValueError, match="ranks"):
        aggregate("ffa", updates, [1, 1], shared_A=shared)
