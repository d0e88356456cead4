"""Registry of aggregation methods and the :func:`aggregate` entry point."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional, Set, Tuple, TypeVar

import numpy as np

from .types import AggregationError, LoraFactors, Updates
from .validation import PreparedUpdates, normalize_weights, prepare_updates

__all__ = ["METHODS", "AggregationFn", "aggregate", "available_methods", "get_method", "register"]

logger = logging.getLogger(__name__)

# A method receives validated updates (numpy arrays) and normalised weights p_k
# (float64, summing to 1) plus keyword options, and returns one LoraFactors per
# module with numpy arrays; :func:`aggregate` converts them back to the input kind.
AggregationFn = Callable[..., Dict[str, LoraFactors]]
F = TypeVar("F", bound=AggregationFn)

#: Registered methods: name -> function.
METHODS: Dict[str, AggregationFn] = {}
# Methods whose clients may send ``A=None`` (A frozen and shared).
_ACCEPTS_MISSING_A: Set[str] = set()


def register(name: str, *, accepts_missing_A: bool = False, overwrite: bool = False) -> Callable[[F], F]:
    """Decorator registering ``fn(prepared, p, **options)`` under ``name``.

    ``prepared`` is a :class:`~fedlora.aggregation.validation.PreparedUpdates`,
    ``p`` the normalised client weights. Set ``accepts_missing_A`` when clients
    may omit ``A``. Re-registering a name raises ``ValueError`` unless
    ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")

    def decorator(fn: F) -> F:
        if name in METHODS and not overwrite:
            raise ValueError(f"aggregation method {name!r} is already registered")
        METHODS[name] = fn
        if accepts_missing_A:
            _ACCEPTS_MISSING_A.add(name)
        else:
            _ACCEPTS_MISSING_A.discard(name)
        return fn

    return decorator


def available_methods() -> Tuple[str, ...]:
    """Names of the registered methods, sorted."""
    return tuple(sorted(METHODS))


def get_method(name: str) -> AggregationFn:
    """The function registered as ``name``; ``ValueError`` listing the methods otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown aggregation method {name!r}; available methods: {', '.join(available_methods())}"
        ) from None


def aggregate(
    method: str,
    updates: Updates,
    weights: Optional[Any] = None,
    **options: Any,
) -> Dict[str, LoraFactors]:
    """Aggregate per-client LoRA factors into one global mapping.

    Args:
        method: a registered method name, see :func:`available_methods`
            (``"fedavg"``, ``"ffa"``, ``"stack"``, ``"svd"``, ``"fedsa"``).
        updates: one mapping per client, module name -> :class:`LoraFactors`
            (``A``: ``(r_k, d_in)``, ``B``: ``(d_out, r_k)``, ``scale = alpha / r_k``);
            numpy arrays or torch tensors.
        weights: per-client example counts (normalised to ``p_k``); ``None`` for
            equal weights.
        **options: method-specific options (see each method's docstring).

    Returns:
        module name -> :class:`LoraFactors` for the global model, with arrays of
        the same kind (numpy/torch), device and dtype as client 0's inputs
        (dtypes promoted across clients; computation is in float64).

    Raises:
        ValueError: unknown method or invalid weights.
        AggregationError: inconsistent or non-finite updates.
    """
    fn = get_method(method)
    start = time.perf_counter()
    prepared: PreparedUpdates = prepare_updates(updates, allow_missing_A=method in _ACCEPTS_MISSING_A)
    p = normalize_weights(weights, len(prepared.clients))
    result = fn(prepared, p, **options)
    missing = [name for name in prepared.modules if name not in result]
    if missing:
        raise AggregationError(f"method {method!r} returned no factors for modules {missing}")
    out: Dict[str, LoraFactors] = {}
    for name in prepared.modules:
        f = result[name]
        spec = prepared.specs[name]
        out[name] = LoraFactors(A=spec.convert(f.A), B=spec.convert(f.B), scale=f.scale)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "aggregated %d clients, %d modules with %r in %.4fs (p=%s)",
            len(prepared.clients),
            len(prepared.modules),
            method,
            time.perf_counter() - start,
            np.array2string(p, precision=3, threshold=8),
        )
    return out
