"""The :class:`Method` every aggregator subclasses, the one registry of aggregators, and
the pure entry point :func:`aggregate`.

An aggregator is one module of this package holding its math (a pure function on
validated client factors) and its protocol (a :class:`Method` subclass naming that
function as :attr:`Method.combine`), registered once with :func:`register`. Both ways
in read the same registry: :func:`aggregate` runs an aggregator's math on client factors,
:func:`get_method` builds its protocol object for a run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, TypeVar

import numpy as np
from torch import nn

from ..adapters import FACTOR_A, FACTOR_B, adapter_state, is_factor_key, load_adapter_state
from .ops import fit_rank
from .states import (
    ReplyShapeError,
    State,
    factors_to_state,
    refit_state,
    state_rank,
    state_to_factors,
    weighted_mean,
)
from .types import AggregationError, LoraFactors, Updates
from .validation import PreparedUpdates, normalize_weights, prepare_updates

__all__ = ["METHODS", "AggregationFn", "Method", "aggregate", "available_methods", "get_method",
           "register"]

log = logging.getLogger(__name__)

# An aggregator's math receives validated updates (numpy arrays) and normalised weights
# p_k (float64, summing to 1) plus keyword options, and returns one LoraFactors per
# module with numpy arrays; :func:`aggregate` converts them back to the input kind.
AggregationFn = Callable[..., Dict[str, LoraFactors]]


@dataclass
class Method:
    """An aggregator: its math (:attr:`combine`) and the FedAvg-style protocol around it
    (the global adapter goes out, full adapters come back), which subclasses change
    where their aggregator needs to.

    ``alpha`` is LoRA's alpha (scale of a rank-r adapter is ``alpha / r``); ``rank`` the
    global adapter's rank; ``options`` the aggregator's own run options.
    """

    name: ClassVar[str] = ""
    # Clients train B only and send no A; the math then accepts updates with A=None.
    freeze_a: ClassVar[bool] = False
    allows_rank_change: ClassVar[bool] = True  # clients may train their own rank
    # int8/int4 error feedback pays where what is sent accumulates (a client starts from
    # the broadcast, the server's global from the replies); not where each round starts over.
    wire_feedback: ClassVar[bool] = True
    # The new global adapter is a weighted mean of the tensors clients send (what a
    # noised mean, user-level DP, can release in its place).
    linear: ClassVar[bool] = True
    # Its math reads every sent tensor other than a head as LoRA's A or B, so it refuses an
    # adapter family that sends others (DoRA's magnitude, VeRA's vectors; see
    # fedlora.adapter_families.compat).
    factors_only: ClassVar[bool] = True
    alpha: float = 16.0
    rank: int = 8
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Subclasses set up the state they carry across rounds here."""

    @staticmethod
    def combine(prepared: PreparedUpdates, p: np.ndarray, **options: Any) -> Dict[str, LoraFactors]:
        """The aggregator's math: module -> global :class:`LoraFactors` (numpy arrays).

        ``prepared`` holds the validated client updates, ``p`` the normalised client
        weights; ``options`` are the aggregator's own keywords. Subclasses set it to
        their pure function (``combine = staticmethod(fn)``); :func:`aggregate` calls it.
        """
        raise NotImplementedError

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    # -- checkpoint ------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[State, dict[str, Any]]:
        """The state this method carries across rounds: (arrays, JSON-able values)."""
        return {}, {}

    def restore_state(self, arrays: Mapping[str, np.ndarray], values: Mapping[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` returned."""
        if arrays:
            raise ValueError(f"method {self.name!r} keeps no arrays across rounds, but the "
                             f"checkpoint has {sorted(arrays)[:3]}")

    # -- server side -----------------------------------------------------------------
    def payload(self, global_state: State) -> State:
        """What the server sends for the current global adapter."""
        return global_state

    def evaluation_state(self, global_state: State) -> State:
        """What the server loads (through :meth:`load`) to evaluate the global adapter."""
        return self.payload(global_state)

    def personal_keys(self, state: Mapping[str, Any]) -> set[str]:
        """Keys of ``state`` that each client keeps for itself across rounds (its node
        state holds them; what it keeps is what it released, never more)."""
        return set()

    def check_reply(self, reply: Mapping[str, np.ndarray], template: Mapping[str, np.ndarray]) -> int:
        """Validate a reply's keys and shapes against the adapter layout; returns its rank.

        ``template`` is a fresh adapter state at the global rank. Replies may come in
        another rank (heterogeneous clients) where the method allows it.
        """
        expected = {k for k in template if not (self.freeze_a and k.endswith(FACTOR_A))}
        extra, missing = sorted(set(reply) - expected), sorted(expected - set(reply))
        if extra:
            raise ReplyShapeError(f"unexpected array key(s) {extra[:3]} (only the adapter "
                                  "tensors of this run may be sent)")
        if missing:
            raise ReplyShapeError(f"missing array key(s) {missing[:3]}")
        rank = state_rank(reply)
        for k, a in reply.items():
            ref = np.shape(template[k])
            if k.endswith(FACTOR_A):
                want = (rank, ref[1])
            elif k.endswith(FACTOR_B):
                want = (ref[0], rank)
            else:
                want = ref
            if tuple(a.shape) != tuple(want):
                raise ReplyShapeError(f"array '{k}' has shape {tuple(a.shape)}, "
                                      f"expected {tuple(want)}")
        if rank is not None and not self.allows_rank_change and rank != self.rank:
            raise ReplyShapeError(f"rank {rank} differs from the global rank {self.rank}, "
                                  f"which '{self.name}' requires")
        return rank if rank is not None else self.rank

    def aggregate(self, replies: list[State], weights: list[int], global_state: State) -> State:
        """The new global adapter from the replies (each in its own rank)."""
        updates = [state_to_factors(r, self.alpha / (state_rank(r) or self.rank)) for r in replies]
        merged: Dict[str, LoraFactors] = {}
        if any(updates):  # an adapter family without LoRA factors (VeRA) has none
            # The module-level aggregate(): this aggregator's math, validated and converted.
            merged = aggregate(self.name, updates, weights, **self._options(global_state))
        if any(f.rank != self.rank for f in merged.values()):
            merged = fit_rank(merged, self.rank)
        p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        out = {k: weighted_mean([r[k] for r in replies], p)
               for k in replies[0] if not is_factor_key(k)}
        out.update(factors_to_state(merged, self.scale))
        return {k: out[k] for k in global_state if k in out} | {
            k: v for k, v in out.items() if k not in global_state}

    def _options(self, global_state: State) -> dict[str, Any]:
        return {"scale": self.scale}

    def export(self, global_state: State) -> tuple[int, float, State]:
        """(rank, alpha, adapter state) of the global model as one peft LoRA adapter."""
        return self.rank, self.alpha, global_state

    def start_state(self, global_state: State, *, rank: int) -> State:
        """What a client of rank ``rank`` started from, in the keys of its reply."""
        if rank != self.rank:
            return refit_state(global_state, rank=rank, from_scale=self.scale,
                               to_scale=self.alpha / rank)
        return dict(global_state)

    def update_norm(self, reply: State, global_state: State, *, rank: int) -> float:
        """L2 norm, over every tensor of a reply, of what the client changed."""
        start = self.start_state(global_state, rank=rank)
        total = 0.0
        for k, v in reply.items():
            d = v.astype(np.float64) - start[k]
            total += float(np.dot(d.ravel(), d.ravel()))
        return float(np.sqrt(total))

    # -- client side -----------------------------------------------------------------
    def load(self, model: nn.Module, payload: State, *, client_rank: int) -> None:
        """Load what the server sent into a client's model of rank ``client_rank``."""
        if client_rank != self.rank:
            payload = refit_state(payload, rank=client_rank, from_scale=self.scale,
                                  to_scale=self.alpha / client_rank)
        load_adapter_state(model, payload)

    def reply(self, model: nn.Module) -> State:
        """The adapter tensors a client sends back."""
        return adapter_state(model)


#: The registered aggregators: name -> :class:`Method` subclass, in registration order.
METHODS: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator registering an aggregator under ``cls.name``.

    ``ValueError`` for a missing name, a name already registered, or a class that sets
    no :attr:`Method.combine`.
    """
    name = cls.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"aggregator {cls.__name__} needs a non-empty string name, got {name!r}")
    if name in METHODS:
        raise ValueError(f"aggregation method {name!r} is already registered "
                         f"(by {METHODS[name].__module__})")
    if cls.combine is Method.combine:
        raise ValueError(f"aggregator {name!r} sets no combine (its aggregation function)")
    METHODS[name] = cls
    return cls


def available_methods() -> Tuple[str, ...]:
    """Names of the registered aggregators, sorted."""
    return tuple(sorted(METHODS))


def _method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown aggregation method {name!r}; available methods: {', '.join(available_methods())}"
        ) from None


def get_method(name: str, *, alpha: float, rank: int, **options: Any) -> Method:
    """The protocol object of aggregator ``name`` for a run (``ValueError`` listing the
    aggregators for an unknown name)."""
    return _method_class(name)(alpha=alpha, rank=rank, options=dict(options))


def aggregate(
    method: str,
    updates: Updates,
    weights: Optional[Any] = None,
    **options: Any,
) -> Dict[str, LoraFactors]:
    """Aggregate per-client LoRA factors into one global mapping.

    ``method`` is a registered aggregator's name (:func:`available_methods`); ``updates``
    has one mapping per client, module name -> :class:`LoraFactors` (``A``: ``(r_k, d_in)``,
    ``B``: ``(d_out, r_k)``, ``scale = alpha / r_k``), numpy arrays or torch tensors;
    ``weights`` are per-client example counts (normalised to ``p_k``; ``None``: equal);
    ``options`` are the aggregator's own (see its function). Returns module name ->
    :class:`LoraFactors` of the global model, arrays of the kind, device and dtype of client
    0's inputs (dtypes promoted across clients; the computation is float64). Raises
    ValueError for an unknown method or invalid weights and :class:`AggregationError` for
    inconsistent or non-finite updates.
    """
    cls = _method_class(method)
    start = time.perf_counter()
    prepared: PreparedUpdates = prepare_updates(updates, allow_missing_A=cls.freeze_a)
    p = normalize_weights(weights, len(prepared.clients))
    result = cls.combine(prepared, p, **options)
    missing = [name for name in prepared.modules if name not in result]
    if missing:
        raise AggregationError(f"method {method!r} returned no factors for modules {missing}")
    out: Dict[str, LoraFactors] = {}
    for name in prepared.modules:
        f = result[name]
        spec = prepared.specs[name]
        out[name] = LoraFactors(A=spec.convert(f.A), B=spec.convert(f.B), scale=f.scale)
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "aggregated %d clients, %d modules with %r in %.4fs (p=%s)",
            len(prepared.clients),
            len(prepared.modules),
            method,
            time.perf_counter() - start,
            np.array2string(p, precision=3, threshold=8),
        )
    return out
