"""FLoRA stacking: exact aggregation by concatenating client factors."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .linalg import stack_factors
from .registry import register
from .types import LoraFactors
from .validation import PreparedUpdates, resolve_scale

__all__ = ["stack"]


@register("stack")
def stack(
    prepared: PreparedUpdates,
    p: np.ndarray,
    *,
    scale: Optional[float] = None,
    alpha: Optional[float] = None,
) -> Dict[str, LoraFactors]:
    """FLoRA: ``B = [B_1 ... B_K]`` and ``A = [c_1 A_1; ...; c_K A_K] / s_out``, ``c_k = p_k s_k``.

    The result has rank ``R = sum_k r_k`` (any client ranks) and is exact:
    ``s_out * B @ A = sum_k p_k s_k B_k @ A_k``. The weights and client scales
    are folded into the stacked ``A``; the output scale ``s_out`` defaults to
    ``1.0`` (``scale=`` sets it, ``alpha=`` gives ``alpha / R``). Clients usually
    fold the result into their frozen base weights with
    :func:`~fedlora.aggregation.delta_weight` and restart LoRA.
    """
    out: Dict[str, LoraFactors] = {}
    for name in prepared.modules:
        factors = prepared.module(name)
        coefs = [pk * f.scale for pk, f in zip(p, factors)]
        B_stack, A_stack = stack_factors(factors, coefs)  # (d_out, R), (R, d_in)
        total_rank = B_stack.shape[1]
        s_out = resolve_scale(total_rank, float(total_rank), scale=scale, alpha=alpha)
        if s_out != 1.0:
            A_stack /= s_out
        out[name] = LoraFactors(A=A_stack, B=B_stack, scale=s_out)
    return out
