"""Pure utilities on LoRA factors: dense deltas, rank fitting, product error."""

from __future__ import annotations

import math
from collections.abc import Mapping as MappingABC
from typing import Any, Dict, Mapping, Optional, Union, overload

import numpy as np

from .backend import OutputSpec, as_float64, is_torch
from .linalg import product_norm, stack_factors
from .types import AggregationError, Array, LoraFactors, Updates, is_finite_scale
from .validation import normalize_weights, prepare_updates

__all__ = ["delta_weight", "fit_rank", "product_error"]


def delta_weight(factors: LoraFactors) -> Array:
    """Dense update ``scale * B @ A`` of shape ``(d_out, d_in)``, same kind as ``B``.

    Used to fold aggregated factors into frozen base weights.
    """
    if factors.A is None:
        raise ValueError("delta_weight needs A; got A=None (pass the shared frozen A)")
    A, B = factors.A, factors.B
    if is_torch(A) and is_torch(B):
        A = A.to(device=B.device, dtype=B.dtype) if A.dtype != B.dtype or A.device != B.device else A
        return (B @ A) * factors.scale
    if not is_torch(A) and not is_torch(B):
        A_np, B_np = np.asarray(A), np.asarray(B)
        dtype = np.result_type(A_np.dtype, B_np.dtype)
        return ((B_np @ A_np) * factors.scale).astype(dtype, copy=False)
    spec = OutputSpec.infer(B, [A])
    return spec.convert(factors.scale * (as_float64(B) @ as_float64(A)))


def _zeros_like(x: Array, shape: tuple) -> Array:
    if is_torch(x):
        import torch  # deferred: aggregation is NumPy unless handed torch tensors

        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    return np.zeros(shape, dtype=np.asarray(x).dtype)


def _concat(parts: list, axis: int) -> Array:
    if is_torch(parts[0]):
        import torch  # deferred: aggregation is NumPy unless handed torch tensors

        return torch.cat(parts, dim=axis)
    return np.concatenate(parts, axis=axis)


def _fit_one(f: LoraFactors, rank: int, scale: Optional[float], alpha: Optional[float]) -> LoraFactors:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    rank = int(rank)
    if scale is not None and alpha is not None:
        raise ValueError("pass at most one of 'scale' and 'alpha'")
    new_scale = f.scale if scale is None and alpha is None else float(scale if scale is not None else alpha / rank)
    if not is_finite_scale(new_scale):
        raise ValueError(f"fit_rank needs a positive finite scale, got {new_scale}")
    r = f.rank
    A, B = f.A, f.B
    if rank <= r:
        A = None if A is None else A[:rank]
        B = B[:, :rank]
    else:
        B = _concat([B, _zeros_like(B, (B.shape[0], rank - r))], axis=1)
        if A is not None:
            A = _concat([A, _zeros_like(A, (rank - r, A.shape[1]))], axis=0)
    if not math.isclose(new_scale, f.scale, rel_tol=1e-15, abs_tol=0.0):
        B = B * (f.scale / new_scale)
    return LoraFactors(A=A, B=B, scale=new_scale)


@overload
def fit_rank(factors: LoraFactors, rank: int, *, scale: Optional[float] = ..., alpha: Optional[float] = ...) -> LoraFactors: ...
@overload
def fit_rank(
    factors: Mapping[str, LoraFactors],
    rank: Union[int, Mapping[str, int]],
    *,
    scale: Optional[float] = ...,
    alpha: Optional[float] = ...,
) -> Dict[str, LoraFactors]: ...


def fit_rank(
    factors: Union[LoraFactors, Mapping[str, LoraFactors]],
    rank: Union[int, Mapping[str, int]],
    *,
    scale: Optional[float] = None,
    alpha: Optional[float] = None,
) -> Union[LoraFactors, Dict[str, LoraFactors]]:
    """Truncate or zero-pad factors to ``rank`` (HetLoRA-style), keeping array kind.

    Truncation keeps the first ``rank`` components (rows of ``A``, columns of
    ``B``); for ``svd`` output these are the leading singular directions, so the
    truncated factors are the best rank-``rank`` approximation. Padding adds
    zero components and leaves the product unchanged.

    Scale: by default the scale is kept, so ``delta_weight`` of the result equals
    the delta of the retained components. With ``alpha=`` the new scale is
    ``alpha / rank`` (the client's LoRA convention) and with ``scale=`` it is set
    explicitly; ``B`` is rescaled by ``old_scale / new_scale`` so the delta of
    the retained components is unchanged either way.

    ``factors`` may be one :class:`LoraFactors` or a mapping module -> factors
    (then ``rank`` may be a mapping module -> rank).
    """
    if isinstance(factors, LoraFactors):
        if isinstance(rank, MappingABC):
            raise TypeError("rank must be an int for a single LoraFactors")
        return _fit_one(factors, rank, scale, alpha)
    out: Dict[str, LoraFactors] = {}
    for name, f in factors.items():
        if isinstance(rank, MappingABC):
            if name not in rank:
                raise ValueError(f"rank has no entry for module {name!r}")
            r = rank[name]
        else:
            r = rank
        out[name] = _fit_one(f, r, scale, alpha)
    return out


def product_error(
    updates: Updates,
    weights: Optional[Any],
    result: Mapping[str, LoraFactors],
    *,
    shared_A: Optional[Mapping[str, Array]] = None,
    relative: bool = True,
) -> Dict[str, float]:
    """Per-module error ``||sum_k p_k s_k B_k A_k - s B A||_F`` of an aggregate.

    Computed in factored form: the difference is the product of
    ``[B_1 .. B_K, -s B]`` and ``[c_1 A_1; ..; c_K A_K; A]`` (``c_k = p_k s_k``),
    whose norm comes from the QR factors of both (see
    :func:`~fedlora.aggregation.linalg.product_norm`); no ``d_out x d_in``
    matrix is formed. With ``relative=True`` (default) the error is divided by
    ``||sum_k p_k s_k B_k A_k||_F`` (``0.0`` if both are zero, ``inf`` if only the
    exact sum is zero). Client updates with ``A=None`` use ``shared_A`` or the
    result's ``A``.
    """
    prepared = prepare_updates(updates, allow_missing_A=True)
    p = normalize_weights(weights, len(prepared.clients))
    errors: Dict[str, float] = {}
    for name in prepared.modules:
        if name not in result:
            raise AggregationError(f"result has no factors for module {name!r}")
        res = result[name]
        if res.A is None:
            raise AggregationError(f"result for module {name!r} has A=None")
        A_res = as_float64(res.A)  # (r, d_in)
        B_res = as_float64(res.B) * res.scale  # (d_out, r)
        if A_res.ndim != 2 or B_res.ndim != 2 or A_res.shape[0] != B_res.shape[1]:
            raise AggregationError(
                f"result for module {name!r} has inconsistent shapes B {tuple(B_res.shape)}, A {tuple(A_res.shape)}"
            )
        factors = []
        for k, f in enumerate(prepared.module(name)):
            if f.A is None:
                A = shared_A[name] if shared_A is not None and name in shared_A else A_res
                f = LoraFactors(A=as_float64(A), B=f.B, scale=f.scale)
            if f.A.shape[0] != f.rank or f.A.shape[1] != A_res.shape[1] or f.d_out != B_res.shape[0]:
                raise AggregationError(
                    f"client {k}, module {name!r}: factors B {tuple(f.B.shape)}, A {tuple(f.A.shape)} "
                    f"do not match the result's (d_out, d_in) = ({B_res.shape[0]}, {A_res.shape[1]})"
                )
            factors.append(f)
        coefs = [pk * f.scale for pk, f in zip(p, factors)]
        B_stack, A_stack = stack_factors(factors, coefs, extra=[(-B_res, A_res)])  # (d_out, R+r), (R+r, d_in)
        err = product_norm(B_stack, A_stack)
        if not relative:
            errors[name] = err
            continue
        exact_rank = B_stack.shape[1] - B_res.shape[1]
        ref = product_norm(B_stack[:, :exact_rank], A_stack[:exact_rank])
        errors[name] = err / ref if ref > 0.0 else (0.0 if err == 0.0 else math.inf)
    return errors
