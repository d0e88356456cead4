"""Property tests of the LoRA aggregation methods (exactness, optimality, scale handling)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.aggregation import (
    LoraFactors,
    aggregate,
    delta_weight,
    fit_rank,
    product_error,
    product_norm,
    product_svd,
)

PROPERTY = settings(deadline=None, max_examples=60, derandomize=True)


# ----------------------------------------------------------------------------- helpers


def make_updates(
    seed: int,
    d_out: int,
    d_in: int,
    ranks: Sequence[int],
    alphas: Sequence[float],
    dtype=np.float64,
    modules: Sequence[str] = ("layer.0.q", "layer.0.v"),
) -> List[Dict[str, LoraFactors]]:
    """Random client updates: one mapping per client, scale = alpha / r."""
    rng = np.random.default_rng(seed)
    updates = []
    for r, alpha in zip(ranks, alphas):
        client = {}
        for name in modules:
            A = rng.standard_normal((r, d_in)).astype(dtype)  # (r, d_in)
            B = rng.standard_normal((d_out, r)).astype(dtype)  # (d_out, r)
            client[name] = LoraFactors(A=A, B=B, scale=alpha / r)
        updates.append(client)
    return updates


def probabilities(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def exact_sum(updates, weights, name: str) -> np.ndarray:
    """Dense sum_k p_k s_k B_k A_k in float64 (tests only)."""
    p = probabilities(weights)
    total = 0.0
    for pk, client in zip(p, updates):
        f = client[name]
        total = total + pk * f.scale * (np.asarray(f.B, np.float64) @ np.asarray(f.A, np.float64))
    return total


def dense(f: LoraFactors) -> np.ndarray:
    return f.scale * (np.asarray(f.B, np.float64) @ np.asarray(f.A, np.float64))


def rel_err(exact: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(exact - approx) / np.linalg.norm(exact))


@st.composite
def client_setups(draw, max_clients: int = 4, max_rank: int = 6, min_clients: int = 1):
    """(seed, d_out, d_in, ranks, alphas, weights) with unequal ranks and alphas."""
    k = draw(st.integers(min_clients, max_clients))
    d_out = draw(st.integers(2, 10))
    d_in = draw(st.integers(2, 10))
    ranks = draw(st.lists(st.integers(1, max_rank), min_size=k, max_size=k))
    alphas = draw(st.lists(st.sampled_from([1.0, 2.0, 8.0, 16.0, 32.0, 3.5]), min_size=k, max_size=k))
    weights = draw(st.lists(st.integers(1, 100), min_size=k, max_size=k))
    seed = draw(st.integers(0, 2**31 - 1))
    return seed, d_out, d_in, ranks, alphas, weights


# ----------------------------------------------------------------------------- stack


@PROPERTY
@given(setup=client_setups(), dtype=st.sampled_from([np.float64, np.float32]))
def test_stack_product_is_exact(setup, dtype):
    seed, d_out, d_in, ranks, alphas, weights = setup
    updates = make_updates(seed, d_out, d_in, ranks, alphas, dtype)
    out = aggregate("stack", updates, weights)
    tol = 1e-12 if dtype == np.float64 else 1e-4
    for name, f in out.items():
        assert f.rank == sum(ranks)
        assert f.scale == 1.0
        assert f.A.dtype == dtype and f.B.dtype == dtype
        assert rel_err(exact_sum(updates, weights, name), dense(f)) <= tol


def test_stack_with_explicit_output_scale_stays_exact():
    updates = make_updates(1, 6, 5, [2, 4, 8], [16.0, 8.0, 32.0])
    weights = [3, 1, 7]
    out = aggregate("stack", updates, weights, alpha=16.0)
    for name, f in out.items():
        assert f.scale == pytest.approx(16.0 / 14)
        assert rel_err(exact_sum(updates, weights, name), dense(f)) <= 1e-12
    # Folding into base weights uses delta_weight.
    np.testing.assert_allclose(delta_weight(out["layer.0.q"]), exact_sum(updates, weights, "layer.0.q"), atol=1e-12)


# ----------------------------------------------------------------------------- svd


def _competitor_errors(exact: np.ndarray, rank: int, rng: np.random.Generator, optimal: LoraFactors):
    """Errors of other rank-r factorisations: random, least-squares fits, perturbed optimum."""
    d_out, d_in = exact.shape
    errors = []
    for _ in range(10):
        A = rng.standard_normal((rank, d_in))
        B = rng.standard_normal((d_out, rank))
        errors.append(np.linalg.norm(exact - B @ A))
        # Best B for this random A (least squares): a strong competitor.
        B_ls = np.linalg.lstsq(A.T, exact.T, rcond=None)[0].T
        errors.append(np.linalg.norm(exact - B_ls @ A))
        # Small perturbation of the optimum.
        eps = 1e-3 * np.linalg.norm(exact)
        B_p = np.asarray(optimal.B) + eps * rng.standard_normal(optimal.B.shape)
        A_p = np.asarray(optimal.A) + eps * rng.standard_normal(optimal.A.shape)
        errors.append(np.linalg.norm(exact - optimal.scale * B_p @ A_p))
    return np.array(errors)


@PROPERTY
@given(setup=client_setups(min_clients=2), rank_frac=st.floats(0.0, 1.0))
def test_svd_error_is_discarded_singular_values_and_optimal(setup, rank_frac):
    seed, d_out, d_in, ranks, alphas, weights = setup
    updates = make_updates(seed, d_out, d_in, ranks, alphas)
    max_rank = min(d_out, d_in, sum(ranks))
    rank = 1 + int(rank_frac * (max_rank - 1))
    report: dict = {}
    out = aggregate("svd", updates, weights, rank=rank, report=report)
    rng = np.random.default_rng(seed)
    rel = product_error(updates, weights, out)
    for name, f in out.items():
        exact = exact_sum(updates, weights, name)
        norm = np.linalg.norm(exact)
        s = np.linalg.svd(exact, compute_uv=False)
        expected = float(np.sqrt(np.sum(s[rank:] ** 2)))
        err = float(np.linalg.norm(exact - dense(f)))
        assert f.rank == rank
        assert abs(err - expected) <= 1e-9 * norm
        assert report[name].truncation_error == pytest.approx(expected, abs=1e-9 * norm)
        assert rel[name] == pytest.approx(err / norm, abs=1e-7)
        # Dense truncated SVD (computed here only) does no better.
        U, S, Vt = np.linalg.svd(exact, full_matrices=False)
        dense_err = np.linalg.norm(exact - (U[:, :rank] * S[:rank]) @ Vt[:rank])
        assert err <= dense_err + 1e-9 * norm
        # No other rank-r factorisation beats it.
        assert np.all(_competitor_errors(exact, rank, rng, f) >= err - 1e-9 * norm)


@PROPERTY
@given(setup=client_setups())
def test_svd_default_scale_and_balanced_factors(setup):
    seed, d_out, d_in, ranks, alphas, weights = setup
    updates = make_updates(seed, d_out, d_in, ranks, alphas)
    out = aggregate("svd", updates, weights)
    p = probabilities(weights)
    alpha_bar = float(np.sum(p * np.asarray(alphas)))
    for f in out.values():
        r = max(ranks)
        assert f.rank == r
        assert f.scale == pytest.approx(alpha_bar / r)
        # Balanced: B^T B == A A^T == diag(S) / scale.
        np.testing.assert_allclose(f.B.T @ f.B, f.A @ f.A.T, atol=1e-9 * (1 + np.abs(f.A @ f.A.T).max()))


def test_svd_full_rank_is_exact_and_pads_with_zeros():
    updates = make_updates(3, 5, 4, [2, 4, 8], [16.0, 16.0, 16.0])
    weights = [1, 2, 3]
    # The target has rank <= min(d_out, d_in) = 4; ask for more.
    out = aggregate("svd", updates, weights, rank=6, alpha=12.0)
    for name, f in out.items():
        assert f.rank == 6 and f.scale == pytest.approx(2.0)
        assert rel_err(exact_sum(updates, weights, name), dense(f)) <= 1e-12
        np.testing.assert_array_equal(f.A[4:], 0.0)
        np.testing.assert_array_equal(f.B[:, 4:], 0.0)


def test_svd_truncation_by_fit_rank_stays_optimal():
    updates = make_updates(4, 9, 7, [2, 4, 8], [8.0, 16.0, 4.0])
    weights = [5, 1, 2]
    out = aggregate("svd", updates, weights, rank=6)
    small = fit_rank(out, 3)
    for name, f in small.items():
        exact = exact_sum(updates, weights, name)
        s = np.linalg.svd(exact, compute_uv=False)
        assert np.linalg.norm(exact - dense(f)) == pytest.approx(np.sqrt(np.sum(s[3:] ** 2)), rel=1e-9)


def test_svd_per_module_rank_and_scale_option():
    updates = make_updates(5, 6, 6, [3, 3], [6.0, 6.0])
    out = aggregate("svd", updates, [1, 1], rank={"layer.0.q": 2, "layer.0.v": 5}, scale=0.5)
    assert out["layer.0.q"].rank == 2 and out["layer.0.v"].rank == 5
    assert out["layer.0.q"].scale == 0.5
    with pytest.raises(ValueError, match="layer.0.v"):
        aggregate("svd", updates, [1, 1], rank={"layer.0.q": 2})
    with pytest.raises(ValueError, match="positive integer"):
        aggregate("svd", updates, [1, 1], rank=0)


def test_svd_near_identical_A_is_accurate():
    """Clients starting from one shared A give an ill-conditioned stacked A."""
    rng = np.random.default_rng(8)
    A0 = rng.standard_normal((4, 30))
    updates = [
        {"m": LoraFactors(A=A0 + 1e-9 * rng.standard_normal(A0.shape), B=rng.standard_normal((20, 4)), scale=2.0)}
        for _ in range(5)
    ]
    weights = [1, 2, 3, 4, 5]
    exact = exact_sum(updates, weights, "m")
    s = np.linalg.svd(exact, compute_uv=False)
    for rank in (2, 4, 6):
        f = aggregate("svd", updates, weights, rank=rank)["m"]
        err = np.linalg.norm(exact - dense(f))
        assert abs(err - np.sqrt(np.sum(s[rank:] ** 2))) <= 1e-10 * s[0]
        # Balanced factors stay (numerically) orthogonal directions.
        gram = f.B.T @ f.B
        np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-8 * s[0])


@pytest.mark.parametrize("explicit_q", [False, True])
@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("shape", [(12, 9, 10), (6, 9, 5), (5, 9, 8)])  # (d_out, R, d_in)
def test_product_svd_matches_dense(explicit_q, rank, shape):
    d_out, R, d_in = shape
    rng = np.random.default_rng(2)
    B = rng.standard_normal((d_out, R))
    A = rng.standard_normal((R, d_in))
    dense_s = np.linalg.svd(B @ A, compute_uv=False)
    psvd = product_svd(B, A, rank, explicit_q=explicit_q)
    n = psvd.s.size
    np.testing.assert_allclose(psvd.s, dense_s[:n], rtol=1e-12)
    k = psvd.singular_values.size
    assert k == min(d_out, R, d_in)
    np.testing.assert_allclose(psvd.singular_values, dense_s[:k], rtol=1e-6, atol=1e-7 * dense_s[0])
    U, Vt = psvd.left(0, n), psvd.right(0, n)
    np.testing.assert_allclose(U.T @ U, np.eye(n), atol=1e-10)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(n), atol=1e-10)
    approx = (U * psvd.s) @ Vt
    assert np.linalg.norm(B @ A - approx) == pytest.approx(np.sqrt(np.sum(dense_s[n:] ** 2)), abs=1e-10)
    assert psvd.tail_norm == pytest.approx(np.sqrt(np.sum(dense_s[n:] ** 2)), abs=1e-10)


def test_product_norm_matches_dense():
    rng = np.random.default_rng(3)
    B = rng.standard_normal((7, 5))
    A = rng.standard_normal((5, 11))
    assert product_norm(B, A) == pytest.approx(np.linalg.norm(B @ A), rel=1e-12)


# ----------------------------------------------------------------------------- fedavg / fedsa


@PROPERTY
@given(setup=client_setups(min_clients=2))
def test_fedavg_is_inexact_and_product_error_reports_it(setup):
    seed, d_out, d_in, ranks, alphas, weights = setup
    updates = make_updates(seed, d_out, d_in, ranks, alphas)
    out = aggregate("fedavg", updates, weights)
    rel = product_error(updates, weights, out)
    abs_err = product_error(updates, weights, out, relative=False)
    for name, f in out.items():
        exact = exact_sum(updates, weights, name)
        err = np.linalg.norm(exact - dense(f))
        assert rel[name] == pytest.approx(err / np.linalg.norm(exact), rel=1e-6, abs=1e-9)
        assert abs_err[name] == pytest.approx(err, rel=1e-6, abs=1e-9)
        # Generic random factors: separate averaging is not the average product.
        assert rel[name] > 1e-3


@PROPERTY
@given(setup=client_setups(max_clients=1))
def test_fedavg_single_client_is_exact(setup):
    seed, d_out, d_in, ranks, alphas, weights = setup
    updates = make_updates(seed, d_out, d_in, ranks, alphas)
    out = aggregate("fedavg", updates, weights)
    for name, f in out.items():
        assert f.scale == pytest.approx(alphas[0] / ranks[0])
        assert rel_err(exact_sum(updates, weights, name), dense(f)) <= 1e-12
        assert product_error(updates, weights, out)[name] <= 1e-12


def test_fedavg_heterogeneous_ranks_zero_pad_and_fit_rank():
    ranks, alpha = [2, 4, 8], 16.0
    updates = make_updates(2, 6, 5, ranks, [alpha] * 3)
    weights = [1, 2, 5]
    p = probabilities(weights)
    out = aggregate("fedavg", updates, weights)
    for name, f in out.items():
        assert f.rank == 8 and f.scale == pytest.approx(alpha / 8)
        A_exp = np.zeros((8, 5))
        B_exp = np.zeros((6, 8))  # sum_k p_k s_k B_k, zero-padded
        for pk, client, r in zip(p, updates, ranks):
            A_exp[:r] += pk * client[name].A
            B_exp[:, :r] += pk * (alpha / r) * client[name].B
        np.testing.assert_allclose(f.A, A_exp, atol=1e-12)
        np.testing.assert_allclose(f.scale * f.B, B_exp, atol=1e-12)
    # Each client gets back factors of its own rank and scale alpha / r_k.
    for r in ranks:
        mine = fit_rank(out, r, alpha=alpha)
        for name, f in mine.items():
            g = out[name]
            assert f.rank == r and f.scale == pytest.approx(alpha / r)
            assert f.A.shape == (r, 5) and f.B.shape == (6, r)
            kept = g.scale * g.B[:, :r] @ g.A[:r]
            np.testing.assert_allclose(dense(f), kept, atol=1e-12)


def test_fedavg_unequal_alphas_folds_scale_into_B():
    updates = make_updates(9, 4, 3, [2, 2], [2.0, 32.0])
    weights = [1, 1]
    out = aggregate("fedavg", updates, weights)
    f = out["layer.0.q"]
    assert f.scale == pytest.approx((2.0 + 32.0) / 2 / 2)
    B_exp = 0.5 * (1.0 * updates[0]["layer.0.q"].B + 16.0 * updates[1]["layer.0.q"].B)
    np.testing.assert_allclose(f.scale * f.B, B_exp, atol=1e-12)
    out2 = aggregate("fedavg", updates, weights, scale=1.0)
    np.testing.assert_allclose(dense(out2["layer.0.q"]), dense(f), atol=1e-12)


def test_fit_rank_padding_is_lossless_and_keeps_kind():
    f = make_updates(0, 5, 4, [3], [6.0])[0]["layer.0.q"]
    padded = fit_rank(f, 7)
    assert padded.rank == 7 and padded.scale == f.scale
    np.testing.assert_allclose(dense(padded), dense(f), atol=1e-12)
    rescaled = fit_rank(f, 7, scale=0.25)
    np.testing.assert_allclose(dense(rescaled), dense(f), atol=1e-12)
    with pytest.raises(ValueError, match="positive integer"):
        fit_rank(f, 0)


def test_fedsa_averages_A_and_returns_fedavg_B():
    updates = make_updates(6, 5, 4, [3, 3, 3], [8.0, 8.0, 8.0])
    weights = [2, 3, 5]
    p = probabilities(weights)
    out = aggregate("fedsa", updates, weights)
    ref = aggregate("fedavg", updates, weights)
    for name, f in out.items():
        np.testing.assert_allclose(f.A, sum(pk * c[name].A for pk, c in zip(p, updates)), atol=1e-12)
        np.testing.assert_allclose(f.B, ref[name].B, atol=1e-12)


