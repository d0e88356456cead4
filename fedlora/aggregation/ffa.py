"""FFA-LoRA: ``A`` frozen at a shared seeded initialisation, only ``B`` is averaged.

Clients train and send ``B`` only; ``A`` stays at its seeded initialisation on every
client and is never sent.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np
from torch import nn

from ..adapters import FACTOR_A, adapter_state, is_factor_key, load_adapter_state, module_of
from .backend import as_float64
from .base import Method, aggregate, register
from .states import ReplyShapeError, State, factors_to_state, state_to_factors, weighted_mean
from .types import AggregationError, Array, LoraFactors
from .validation import PreparedUpdates, resolve_scale, weighted_alpha

__all__ = ["FfaMethod", "ffa"]


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


@register
class FfaMethod(Method):
    """FFA-LoRA: A frozen at the shared seeded initialisation and never sent; B averaged."""

    name = "ffa"
    combine = staticmethod(ffa)
    freeze_a = True
    allows_rank_change = False

    def payload(self, global_state: State) -> State:
        return {k: v for k, v in global_state.items() if not k.endswith(FACTOR_A)}

    def aggregate(self, replies: list[State], weights: list[int], global_state: State) -> State:
        shared_a = {module_of(k): v for k, v in global_state.items() if k.endswith(FACTOR_A)}
        full = [dict(r, **{m + FACTOR_A: a for m, a in shared_a.items()}) for r in replies]
        updates = [state_to_factors(r, self.scale) for r in full]
        merged = aggregate(self.name, updates, weights, shared_A=shared_a, scale=self.scale)
        p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        out = dict(global_state)
        out.update({k: weighted_mean([r[k] for r in replies], p)
                    for k in replies[0] if not is_factor_key(k)})
        out.update(factors_to_state(merged, self.scale))
        return out

    def load(self, model: nn.Module, payload: State, *, client_rank: int) -> None:
        if client_rank != self.rank:
            raise ReplyShapeError(f"FFA-LoRA needs every client at the global rank {self.rank}; "
                                  f"this site asks for lora-rank {client_rank}")
        current = adapter_state(model)  # A stays at the seeded initialisation
        load_adapter_state(model, {**{k: v for k, v in current.items() if k.endswith(FACTOR_A)},
                                   **payload})

    def reply(self, model: nn.Module) -> State:
        return {k: v for k, v in adapter_state(model).items() if not k.endswith(FACTOR_A)}

    def start_state(self, global_state: State, *, rank: int) -> State:
        return self.payload(global_state)
