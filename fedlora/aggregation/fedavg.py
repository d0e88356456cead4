"""FedAvg (FedIT) with HetLoRA rank fitting: ``A`` and ``B`` averaged separately.

This is the classical baseline and is *inexact by design*:
``mean(B) @ mean(A) != mean(B @ A)``. Use :func:`~fedlora.aggregation.product_error`
to measure by how much. Its protocol is the plain :class:`~fedlora.aggregation.Method`.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .base import Method, register
from .types import LoraFactors
from .validation import PreparedUpdates, resolve_scale, weighted_alpha

__all__ = ["FedAvgMethod", "fedavg"]


def fedavg(
    prepared: PreparedUpdates,
    p: np.ndarray,
    *,
    scale: Optional[float] = None,
    alpha: Optional[float] = None,
) -> Dict[str, LoraFactors]:
    """FedIT / HetLoRA averaging (inexact baseline): weighted separate averages of ``A``
    and of ``s_k * B``, zero-padded to the max rank.

    For each module, with ``r = max_k r_k`` and ``A_k``/``B_k`` zero-padded to rank ``r``
    (HetLoRA): ``A = sum_k p_k A_k`` and ``B = (sum_k p_k s_k B_k) / s_out`` so that
    ``s_out * B @ A = (sum_k p_k s_k B_k) @ (sum_k p_k A_k)``.

    Options:
        scale: output scale ``s_out`` (default ``alpha_bar / r_max`` with
            ``alpha_bar = sum_k p_k s_k r_k``, the common alpha when all clients share it).
        alpha: output alpha, giving ``s_out = alpha / r_max``.

    The scale is folded into ``B`` before averaging, so clients with different ``alpha``
    or rank are combined consistently. Give each client its own rank back with
    :func:`~fedlora.aggregation.fit_rank`. Exact only for a single client (or
    identical ``A``'s).
    """
    out: Dict[str, LoraFactors] = {}
    for name in prepared.modules:
        factors = prepared.module(name)
        rank = max(f.rank for f in factors)
        d_out = factors[0].d_out
        d_in = next(f.d_in for f in factors if f.A is not None)
        A = np.zeros((rank, d_in))  # (r, d_in)
        B_scaled = np.zeros((d_out, rank))  # (d_out, r): sum_k p_k s_k B_k
        for pk, f in zip(p, factors):
            if pk == 0.0:
                continue
            r = f.rank
            A[:r] += pk * f.A.astype(np.float64, copy=False)
            B_scaled[:, :r] += (pk * f.scale) * f.B.astype(np.float64, copy=False)
        s_out = resolve_scale(rank, weighted_alpha(factors, p), scale=scale, alpha=alpha)
        B_scaled /= s_out
        out[name] = LoraFactors(A=A, B=B_scaled, scale=s_out)
    return out


@register
class FedAvgMethod(Method):
    """A and B averaged separately (inexact); heterogeneous ranks zero-padded (HetLoRA);
    any other tensor averaged as it is."""

    name = "fedavg"
    combine = staticmethod(fedavg)
    # Every other sent tensor (a head, DoRA's magnitude, VeRA's vectors) is averaged
    # elementwise by the protocol.
    factors_only = False
