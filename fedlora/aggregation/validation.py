"""Validation and normalisation of client weights and client updates."""

from __future__ import annotations

from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .backend import OutputSpec, to_numpy
from .types import AggregationError, LoraFactors, Updates, is_finite_scale

__all__ = [
    "PreparedUpdates",
    "check_rank_option",
    "normalize_weights",
    "prepare_updates",
    "resolve_scale",
    "weighted_alpha",
]


def normalize_weights(weights: Optional[Any], num_clients: int) -> np.ndarray:
    """Turn per-client example counts into probabilities ``p_k`` (float64, sums to 1).

    ``weights=None`` means equal weights. Raises ``ValueError`` naming the problem
    for a length mismatch, non-finite or negative entries, or a zero sum.
    """
    if num_clients <= 0:
        raise ValueError("there are no client updates to aggregate")
    if weights is None:
        return np.full(num_clients, 1.0 / num_clients)
    try:
        w = to_numpy(weights).astype(np.float64, copy=True)
    except TypeError as exc:
        raise ValueError(f"weights must be real numbers: {exc}") from exc
    if w.ndim != 1:
        raise ValueError(f"weights must be a 1-D sequence, got shape {tuple(w.shape)}")
    if w.shape[0] != num_clients:
        raise ValueError(
            f"weights has length {w.shape[0]} but there are {num_clients} client updates"
        )
    bad = np.flatnonzero(~np.isfinite(w))
    if bad.size:
        raise ValueError(f"weights must be finite; got {w[bad[0]]} for client {int(bad[0])}")
    neg = np.flatnonzero(w < 0)
    if neg.size:
        raise ValueError(f"weights must be non-negative; got {w[neg[0]]} for client {int(neg[0])}")
    total = float(w.sum())
    if not total > 0.0:
        raise ValueError("weights sum to zero; at least one client needs a positive weight")
    return w / total


@dataclass
class PreparedUpdates:
    """Validated updates: numpy arrays (floating dtype) plus per-module output specs."""

    clients: List[Dict[str, LoraFactors]]
    modules: List[str]
    specs: Dict[str, OutputSpec]

    def module(self, name: str) -> List[LoraFactors]:
        """The factors of every client for module ``name``."""
        return [client[name] for client in self.clients]


def _fail(k: int, name: str, problem: str) -> AggregationError:
    return AggregationError(f"client {k}, module {name!r}: {problem}")


def _check_array(k: int, name: str, which: str, value: Any) -> np.ndarray:
    try:
        arr = to_numpy(value)
    except TypeError as exc:
        raise _fail(k, name, f"{which} is not a real array ({exc})") from exc
    if arr.ndim != 2:
        raise _fail(k, name, f"{which} must be 2-D, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise _fail(k, name, f"{which} contains non-finite values (NaN or inf)")
    return arr


def prepare_updates(updates: Updates, *, allow_missing_A: bool = False) -> PreparedUpdates:
    """Validate ``updates`` and convert every factor to a numpy array.

    Checks that every client sends the same module names, that shapes agree
    (``A``: ``(r_k, d_in)``, ``B``: ``(d_out, r_k)`` with ``d_in``/``d_out`` equal
    across clients), that all values are finite and that every scale is a
    positive finite number. Raises :class:`AggregationError` naming the client
    index, the module and the problem.
    """
    if isinstance(updates, MappingABC) or not isinstance(updates, Sequence):
        try:
            updates = list(updates)  # type: ignore[arg-type]
        except TypeError as exc:
            raise AggregationError("updates must be a sequence of per-client mappings") from exc
        if updates and not isinstance(updates[0], MappingABC):
            raise AggregationError("updates must be a sequence of per-client mappings")
    if len(updates) == 0:
        raise AggregationError("there are no client updates to aggregate")

    first = updates[0]
    if not isinstance(first, MappingABC):
        raise AggregationError(f"client 0: expected a mapping module -> LoraFactors, got {type(first).__name__}")
    modules = list(first.keys())
    reference_keys = set(modules)
    for k, update in enumerate(updates):
        if not isinstance(update, MappingABC):
            raise AggregationError(
                f"client {k}: expected a mapping module -> LoraFactors, got {type(update).__name__}"
            )
        keys = set(update.keys())
        if keys != reference_keys:
            missing = sorted(map(str, reference_keys - keys))
            extra = sorted(map(str, keys - reference_keys))
            raise AggregationError(
                f"client {k}: module names differ from client 0 (missing {missing}, unexpected {extra})"
            )

    clients: List[Dict[str, LoraFactors]] = [dict() for _ in updates]
    specs: Dict[str, OutputSpec] = {}
    for name in modules:
        d_out: Optional[int] = None
        d_in: Optional[int] = None
        originals: List[Any] = []
        for k, update in enumerate(updates):
            f = update[name]
            if not isinstance(f, LoraFactors):
                raise _fail(k, name, f"expected LoraFactors, got {type(f).__name__}")
            if not is_finite_scale(f.scale):
                raise _fail(k, name, f"scale must be a positive finite number, got {f.scale}")
            B = _check_array(k, name, "B", f.B)
            if f.A is None:
                if not allow_missing_A:
                    raise _fail(k, name, "A is missing (None); only methods with a frozen A accept that")
                A = None
            else:
                A = _check_array(k, name, "A", f.A)
            r = B.shape[1]
            if r < 1:
                raise _fail(k, name, "rank must be at least 1 (B has no columns)")
            if A is not None and A.shape[0] != r:
                raise _fail(k, name, f"A has {A.shape[0]} rows but B has {r} columns (rank mismatch)")
            if d_out is None:
                d_out = B.shape[0]
            elif B.shape[0] != d_out:
                raise _fail(k, name, f"B has {B.shape[0]} rows but other clients have d_out={d_out}")
            if A is not None:
                if d_in is None:
                    d_in = A.shape[1]
                elif A.shape[1] != d_in:
                    raise _fail(k, name, f"A has {A.shape[1]} columns but other clients have d_in={d_in}")
            clients[k][name] = LoraFactors(A=A, B=B, scale=f.scale)
            originals.extend([f.B, f.A])
        specs[name] = OutputSpec.infer(updates[0][name].B, originals)
    return PreparedUpdates(clients=clients, modules=modules, specs=specs)


def resolve_scale(
    rank: int,
    default_alpha: float,
    *,
    scale: Optional[float] = None,
    alpha: Optional[float] = None,
) -> float:
    """Output scale from the ``scale=``/``alpha=`` options (mutually exclusive).

    ``scale`` is used as is; ``alpha`` gives ``alpha / rank``; with neither,
    ``default_alpha / rank``.
    """
    if scale is not None and alpha is not None:
        raise ValueError("pass at most one of the options 'scale' and 'alpha'")
    if scale is not None:
        out = float(scale)
        what = "scale"
    else:
        out = float(default_alpha if alpha is None else alpha) / rank
        what = "alpha" if alpha is not None else "default alpha"
    if not is_finite_scale(out):
        raise ValueError(f"output {what} must give a positive finite scale, got {out}")
    return out


def check_rank_option(rank: Any, name: str) -> int:
    """Validate a target rank option for module ``name``."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank for module {name!r} must be a positive integer, got {rank!r}")
    return int(rank)


def weighted_alpha(factors: Sequence[LoraFactors], p: np.ndarray) -> float:
    """Weighted mean of the client alphas ``sum_k p_k * s_k * r_k``."""
    return float(sum(pk * f.scale * f.rank for pk, f in zip(p, factors)))

