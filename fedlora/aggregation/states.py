"""Adapter states to and from :class:`~fedlora.aggregation.LoraFactors`.

Adapter states are ``{peft key: float32 ndarray}`` (see :mod:`fedlora.adapters`); a
client's own LoRA scale is ``alpha / r_k``. The protocol of every aggregator
(:class:`~fedlora.aggregation.Method`) converts with these helpers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..adapters import FACTOR_A, FACTOR_B, is_factor_key, module_of
from .ops import fit_rank
from .types import LoraFactors

__all__ = ["ReplyShapeError", "State", "factors_to_state", "refit_state", "state_rank",
           "state_to_factors", "weighted_mean"]

State = dict[str, np.ndarray]


class ReplyShapeError(ValueError):
    """A reply's adapter tensors do not fit what the server sent."""


def state_to_factors(state: Mapping[str, np.ndarray], scale: float) -> dict[str, LoraFactors]:
    """Module -> LoraFactors(A, B, scale) for every LoRA module of an adapter state."""
    modules = sorted({module_of(k) for k in state if is_factor_key(k)})
    return {m: LoraFactors(A=state.get(m + FACTOR_A), B=state[m + FACTOR_B], scale=scale)
            for m in modules}


def factors_to_state(factors: Mapping[str, LoraFactors], scale: float) -> State:
    """Adapter-state tensors of ``factors`` expressed in LoRA scale ``scale``.

    ``B`` is rescaled by ``f.scale / scale`` so that ``scale * B @ A`` is unchanged.
    """
    out: State = {}
    for m, f in factors.items():
        if f.A is not None:
            out[m + FACTOR_A] = np.asarray(f.A, dtype=np.float32)
        out[m + FACTOR_B] = (np.asarray(f.B, dtype=np.float64) * (f.scale / scale)).astype(np.float32)
    return out


def state_rank(state: Mapping[str, np.ndarray]) -> int | None:
    """The LoRA rank of an adapter state (columns of its B factors), None if it has none."""
    ranks = {np.shape(v)[1] for k, v in state.items() if k.endswith(FACTOR_B)}
    if len(ranks) > 1:
        raise ReplyShapeError(f"factors of different ranks {sorted(ranks)} in one adapter")
    return ranks.pop() if ranks else None


def refit_state(state: Mapping[str, np.ndarray], *, rank: int, from_scale: float,
                to_scale: float) -> State:
    """Truncate or zero-pad the factors of ``state`` to ``rank`` (HetLoRA), changing the
    scale from ``from_scale`` to ``to_scale`` without changing the retained update."""
    factors = state_to_factors(state, from_scale)
    fitted = fit_rank(factors, rank, scale=to_scale)
    out = {k: v for k, v in state.items() if not is_factor_key(k)}
    out.update(factors_to_state(fitted, to_scale))
    return out


def weighted_mean(arrays: list[np.ndarray], p: np.ndarray) -> np.ndarray:
    """``sum_k p_k arrays[k]`` in float64, returned as float32 (the non-factor tensors)."""
    return np.tensordot(p, np.stack(arrays).astype(np.float64), axes=1).astype(np.float32)
