"""API tests of fedlora.aggregation: registry, validation errors, numpy/torch round trips."""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil

import numpy as np
import pytest
import torch

from fedlora.aggregation import (
    METHODS,
    AggregationError,
    LoraFactors,
    Method,
    SvdErrorFeedback,
    aggregate,
    available_methods,
    delta_weight,
    fit_rank,
    get_method,
    normalize_weights,
    product_error,
    register,
)

ALL_METHODS = ["fedavg", "ffa", "stack", "svd", "fedsa"]


def _updates(ranks=(2, 3), d_out=5, d_in=4, seed=0, alpha=8.0, modules=("q", "v")):
    rng = np.random.default_rng(seed)
    return [
        {
            m: LoraFactors(A=rng.standard_normal((r, d_in)), B=rng.standard_normal((d_out, r)), scale=alpha / r)
            for m in modules
        }
        for r in ranks
    ]


def _same_A_updates(k=3, r=3, d_out=5, d_in=4, seed=0):
    rng = np.random.default_rng(seed)
    A = {m: rng.standard_normal((r, d_in)) for m in ("q", "v")}
    return [
        {m: LoraFactors(A=A[m], B=rng.standard_normal((d_out, r)), scale=2.0) for m in A} for _ in range(k)
    ]


def _replace(updates, client, module, **changes):
    updates = [dict(u) for u in updates]
    updates[client][module] = updates[client][module].replace(**changes)
    return updates


# ----------------------------------------------------------------------------- registry


def test_available_methods_lists_builtins():
    assert set(ALL_METHODS) <= set(available_methods())


def test_unknown_method_lists_available():
    with pytest.raises(ValueError, match=r"unknown aggregation method 'nope'.*fedavg.*svd"):
        aggregate("nope", _updates(), [1, 1])


def test_register_custom_method_and_duplicate_name():
    name = "first_client_only"

    def first_client(prepared, p, **options):
        return {m: prepared.clients[0][m] for m in prepared.modules}

    try:

        @register
        class FirstClientOnly(Method):
            name = "first_client_only"
            combine = staticmethod(first_client)

        assert name in available_methods()
        updates = _updates()
        out = aggregate(name, updates, [1, 1])
        np.testing.assert_array_equal(out["q"].A, updates[0]["q"].A)
        assert isinstance(get_method(name, alpha=8.0, rank=2), FirstClientOnly)
        with pytest.raises(ValueError, match="already registered"):
            register(FirstClientOnly)
    finally:
        METHODS.pop(name, None)
    assert name not in available_methods()


def test_register_refuses_a_method_without_its_aggregation():
    class NoMath(Method):
        name = "no_math"

    with pytest.raises(ValueError, match="sets no combine"):
        register(NoMath)
    assert "no_math" not in METHODS


def test_one_module_per_aggregator_holds_its_aggregation_and_its_method():
    """Each name is registered once, by the module named after it, which sets both the
    aggregation function (``combine``) and the protocol (its Method subclass); the pure
    entry point and the protocol getter read the same registry."""
    package = importlib.import_module("fedlora.aggregation")
    modules = {info.name for info in pkgutil.iter_modules(package.__path__)}
    defined: dict[str, list[str]] = {}
    for module_name in sorted(modules):
        module = importlib.import_module(f"fedlora.aggregation.{module_name}")
        for obj in vars(module).values():
            if inspect.isclass(obj) and obj.__module__ == module.__name__ and obj in METHODS.values():
                defined.setdefault(module_name, []).append(obj.name)
    assert sorted(n for names in defined.values() for n in names) == sorted(METHODS)
    for name, cls in METHODS.items():
        assert cls.__module__ == f"fedlora.aggregation.{name}", name
        assert defined[name] == [name], name
        # combine is set by the class itself, not inherited from another aggregator
        assert "combine" in vars(cls) and callable(cls.combine), name
        assert cls.combine is not Method.combine, name
    assert set(available_methods()) == set(METHODS) >= set(ALL_METHODS)
    updates = _same_A_updates()
    for name in available_methods():
        out = aggregate(name, updates, [1, 2, 3])
        assert set(out) == {"q", "v"}, name
        method = get_method(name, alpha=8.0, rank=3)
        assert type(method) is METHODS[name] and method.name == name


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1.0, -1.0], "non-negative"),
        ([0, 0], "sum to zero"),
        ([1.0, math.nan], "finite"),
        ([1.0, math.inf], "finite"),
        ([1.0], "length 1 but there are 2"),
        ([[1.0, 2.0]], "1-D"),
    ],
)
def test_bad_weights_raise_value_error(weights, message):
    with pytest.raises(ValueError, match=message):
        aggregate("fedavg", _updates(), weights)


def test_weights_normalised_and_accept_tensors():
    np.testing.assert_allclose(normalize_weights(torch.tensor([1, 3]), 2), [0.25, 0.75])
    np.testing.assert_allclose(normalize_weights(None, 4), [0.25] * 4)
    np.testing.assert_allclose(normalize_weights(np.array([0, 5]), 2), [0.0, 1.0])


def test_zero_weight_client_is_ignored_by_svd():
    updates = _updates(ranks=(2, 3, 4))
    out = aggregate("svd", updates, [1, 0, 1], rank=9)
    ref = aggregate("svd", [updates[0], updates[2]], [1, 1], rank=9)
    for m in out:
        np.testing.assert_allclose(delta_weight(out[m]), delta_weight(ref[m]), atol=1e-12)


# ----------------------------------------------------------------------------- update validation


def test_mismatched_module_keys():
    updates = _updates()
    updates[1] = {"q": updates[1]["q"], "k": updates[1]["v"]}
    with pytest.raises(AggregationError, match=r"client 1: module names differ.*missing \['v'\].*unexpected \['k'\]"):
        aggregate("fedavg", updates, [1, 1])


@pytest.mark.parametrize("method", ["fedavg", "stack", "svd", "fedsa"])
def test_shape_errors_name_client_and_module(method):
    base = _updates()
    bad_d_in = _replace(base, 1, "v", A=np.ones((3, 7)))
    with pytest.raises(AggregationError, match=r"client 1, module 'v': A has 7 columns.*d_in=4"):
        aggregate(method, bad_d_in, [1, 1])
    bad_d_out = _replace(base, 1, "q", B=np.ones((9, 3)))
    with pytest.raises(AggregationError, match=r"client 1, module 'q': B has 9 rows.*d_out=5"):
        aggregate(method, bad_d_out, [1, 1])
    bad_rank = _replace(base, 0, "q", A=np.ones((3, 4)))
    with pytest.raises(AggregationError, match=r"client 0, module 'q': A has 3 rows but B has 2 columns"):
        aggregate(method, bad_rank, [1, 1])
    not_2d = _replace(base, 1, "q", B=np.ones(5))
    with pytest.raises(AggregationError, match=r"client 1, module 'q': B must be 2-D"):
        aggregate(method, not_2d, [1, 1])


@pytest.mark.parametrize("which", ["A", "B"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_values(which, value):
    updates = _updates()
    arr = np.array(getattr(updates[1]["v"], which))
    arr[0, 0] = value
    bad = _replace(updates, 1, "v", **{which: arr})
    with pytest.raises(AggregationError, match=rf"client 1, module 'v': {which} contains non-finite"):
        aggregate("svd", bad, [1, 1])


def test_bad_scale_missing_A_and_wrong_types():
    updates = _updates()
    with pytest.raises(AggregationError, match=r"client 0, module 'q': scale must be a positive finite"):
        aggregate("fedavg", _replace(updates, 0, "q", scale=math.nan), [1, 1])
    with pytest.raises(AggregationError, match=r"client 1, module 'q': A is missing"):
        aggregate("stack", _replace(updates, 1, "q", A=None), [1, 1])
    with pytest.raises(AggregationError, match=r"client 1, module 'q': expected LoraFactors"):
        aggregate("fedavg", [updates[0], {"q": (1, 2), "v": updates[1]["v"]}], [1, 1])
    with pytest.raises(AggregationError, match="no client updates"):
        aggregate("fedavg", [], [])
    with pytest.raises(ValueError, match="at most one"):
        aggregate("svd", updates, [1, 1], scale=1.0, alpha=2.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        aggregate("fedavg", updates, [1, 1], rank=3)


# ----------------------------------------------------------------------------- numpy / torch


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_in_torch_out(method, dtype):
    updates = _same_A_updates() if method == "ffa" else _updates(ranks=(2, 3, 4))
    as_torch = [
        {m: LoraFactors(A=torch.tensor(f.A, dtype=dtype), B=torch.tensor(f.B, dtype=dtype), scale=f.scale) for m, f in u.items()}
        for u in updates
    ]
    weights = [1, 2, 3]
    out_t = aggregate(method, as_torch, torch.tensor(weights))
    out_np = aggregate(method, updates, weights)
    for m, f in out_t.items():
        assert isinstance(f.A, torch.Tensor) and isinstance(f.B, torch.Tensor)
        assert f.A.dtype == dtype and f.B.dtype == dtype
        delta = delta_weight(f)
        assert isinstance(delta, torch.Tensor) and delta.shape == (5, 4)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        np.testing.assert_allclose(delta.double().numpy(), delta_weight(out_np[m]), atol=tol, rtol=tol)


def test_numpy_float32_in_float32_out_and_requires_grad():
    updates = _updates()
    f32 = [{m: LoraFactors(A=f.A.astype(np.float32), B=f.B.astype(np.float32), scale=f.scale) for m, f in u.items()} for u in updates]
    out = aggregate("svd", f32, [1, 1])
    assert out["q"].A.dtype == np.float32 and out["q"].B.dtype == np.float32
    grad = [
        {m: LoraFactors(A=torch.tensor(f.A, requires_grad=True), B=torch.tensor(f.B, requires_grad=True), scale=f.scale) for m, f in u.items()}
        for u in updates
    ]
    out_t = aggregate("stack", grad, [1, 1])
    assert not out_t["q"].B.requires_grad


def test_mixed_numpy_torch_follows_client_zero_and_promotes_dtype():
    updates = _updates()
    mixed = [
        updates[0],
        {m: LoraFactors(A=torch.tensor(f.A, dtype=torch.float32), B=torch.tensor(f.B, dtype=torch.float32), scale=f.scale) for m, f in updates[1].items()},
    ]
    out = aggregate("stack", mixed, [1, 1])
    assert isinstance(out["q"].A, np.ndarray) and out["q"].A.dtype == np.float64
    mixed.reverse()
    out = aggregate("stack", mixed, [1, 1])
    assert isinstance(out["q"].A, torch.Tensor) and out["q"].A.dtype == torch.float64
    bf16 = [
        {m: LoraFactors(A=torch.tensor(f.A, dtype=torch.bfloat16), B=torch.tensor(f.B, dtype=torch.bfloat16), scale=f.scale) for m, f in u.items()}
        for u in updates
    ]
    out = aggregate("fedavg", bf16, [1, 1])
    assert out["q"].B.dtype == torch.bfloat16


def test_fit_rank_and_product_error_with_torch():
    updates = _updates(ranks=(2, 4))
    as_torch = [{m: LoraFactors(A=torch.tensor(f.A), B=torch.tensor(f.B), scale=f.scale) for m, f in u.items()} for u in updates]
    out = aggregate("fedavg", as_torch, [1, 1])
    small = fit_rank(out, 2, alpha=8.0)
    assert isinstance(small["q"].A, torch.Tensor) and small["q"].rank == 2
    big = fit_rank(out["q"], 6)
    assert isinstance(big.B, torch.Tensor) and big.rank == 6
    torch.testing.assert_close(delta_weight(big), delta_weight(out["q"]))
    err_t = product_error(as_torch, [1, 1], out)
    err_np = product_error(updates, [1, 1], aggregate("fedavg", updates, [1, 1]))
    assert err_t["q"] == pytest.approx(err_np["q"], rel=1e-9)


def test_state_accepts_torch_residuals_in_load_state_dict():
    state = SvdErrorFeedback()
    updates = _updates(ranks=(3, 3))
    aggregate("svd", updates, [1, 1], rank=1, state=state)
    snapshot = state.state_dict()
    as_torch = {
        **snapshot,
        "residuals": {m: {k: torch.from_numpy(v) for k, v in pair.items()} for m, pair in snapshot["residuals"].items()},
    }
    restored = SvdErrorFeedback()
    restored.load_state_dict(as_torch)
    for m in snapshot["residuals"]:
        np.testing.assert_array_equal(restored.residuals[m][0], state.residuals[m][0])
    with pytest.raises(AggregationError, match="stored residual"):
        aggregate("svd", _updates(d_out=6), [1, 1], rank=1, state=state)
