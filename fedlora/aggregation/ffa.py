"""FFA-LoRA: ``A`` frozen at a shared seeded initialisation, only ``B`` is averaged."""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from .backend import as_float64
from .registry import register
from .types import AggregationError, Array, LoraFactors
from .validation import PreparedUpdates, resolve_scale, weighted_alpha

__all__ = ["ffa"]


def _reference_A(
    name: str,
    prepared: PreparedUpdates,
    shared_A: Optional[Mapping[str, Array]],
    previous: Optional[Mapping[str, LoraFactors]],
) -> Tuple[Optional[np.ndarray], str]:
    """The frozen ``A`` of module ``name`` and a description of where it came from."""
    if shared_A is not None and name in shared_A and shared_A[name] is not None:
        return as_float64(shared_A[name]), "shared_A"
    if previous is not None and name in previous and previous[name].A is not None:
        return as_float64(previous[name].A), "previous"
    for k, f in enumerate(prepared.module(name)):
        if f.A is not None:
            return f.A.astype(np.float64, copy=False), f"client {k}"
    return None, ""


@register("ffa", accepts_missing_A=True)
def ffa(
    prepared: PreparedUpdates,
    p: np.ndarray,
    *,
    shared_A: Optional[Mapping[str, Array]] = None,
    previous: Optional[Mapping[str, LoraFactors]] = None,
    check_frozen: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    scale: Optional[float] = None,
    alpha: Optional[float] = None,
) -> Dict[str, LoraFactors]:
    """FFA-LoRA: ``B = (sum_k p_k s_k B_k) / s_out`` with the shared frozen ``A``.

    Options:
        shared_A: module -> frozen ``A`` (``(r, d_in)``); clients may then send ``A=None``.
        previous: the previous global mapping; its ``A`` is used when ``shared_A``
            lacks a module. Failing both, the first ``A`` sent by a client is used.
        check_frozen: when true (default), every ``A`` a client sends must equal
            the shared one (``numpy.allclose`` with ``rtol``/``atol``), otherwise
            :class:`AggregationError`; when false, client ``A``'s are ignored.
        scale / alpha: output scale as in ``fedavg``; default
            ``sum_k p_k s_k`` (the common scale when all clients share it).

    Exact: ``s_out * B @ A = sum_k p_k s_k B_k @ A``. All clients must have the
    same rank on a module.
    """
    out: Dict[str, LoraFactors] = {}
    for name in prepared.modules:
        factors = prepared.module(name)
        ranks = [f.rank for f in factors]
        if len(set(ranks)) != 1:
            raise AggregationError(
                f"module {name!r}: FFA-LoRA needs one rank for all clients, got ranks {ranks}"
            )
        rank = ranks[0]
        A_ref, source = _reference_A(name, prepared, shared_A, previous)
        if A_ref is None:
            raise AggregationError(
                f"module {name!r}: no frozen A available; pass shared_A=..., previous=... "
                "or let clients send A"
            )
        if A_ref.ndim != 2 or A_ref.shape[0] != rank:
            raise AggregationError(
                f"module {name!r}: frozen A from {source} has shape {tuple(A_ref.shape)}, "
                f"expected ({rank}, d_in)"
            )
        if not np.isfinite(A_ref).all():
            raise AggregationError(f"module {name!r}: frozen A from {source} contains non-finite values")
        for k, f in enumerate(factors):
            if f.A is None:
                continue
            if f.A.shape != A_ref.shape:
                raise AggregationError(
                    f"client {k}, module {name!r}: A has shape {tuple(f.A.shape)} but the frozen A "
                    f"from {source} has shape {tuple(A_ref.shape)}"
                )
            if check_frozen and not np.allclose(f.A, A_ref, rtol=rtol, atol=atol):
                diff = float(np.max(np.abs(f.A.astype(np.float64) - A_ref)))
                raise AggregationError(
                    f"client {k}, module {name!r}: A differs from the frozen A from {source} "
                    f"(max abs difference {diff:.3g}); FFA-LoRA requires A frozen at the shared init"
                )
        B_scaled = np.zeros((factors[0].d_out, rank))  # (d_out, r): sum_k p_k s_k B_k
        for pk, f in zip(p, factors):
            if pk != 0.0:
                B_scaled += (pk * f.scale) * f.B.astype(np.float64, copy=False)
        s_out = resolve_scale(rank, weighted_alpha(factors, p), scale=scale, alpha=alpha)
        B_scaled /= s_out
        out[name] = LoraFactors(A=np.array(A_ref, dtype=np.float64, copy=True), B=B_scaled, scale=s_out)
    return out
