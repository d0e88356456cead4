"""The FedAvg-style :class:`Method` protocol, the registry of methods, and the helpers
they share to convert adapter states to and from :class:`fedlora.aggregation.LoraFactors`.

Adapter states are ``{peft key: float32 ndarray}`` (see :mod:`fedlora.adapters`); a
client's own LoRA scale is ``alpha / r_k``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from torch import nn

from .. import aggregation
from ..adapters import FACTOR_A, FACTOR_B, adapter_state, is_factor_key, load_adapter_state, module_of

__all__ = ["Method", "METHODS", "register_method", "get_method", "state_to_factors",
           "factors_to_state", "state_rank", "refit_state", "ReplyShapeError", "State"]

log = logging.getLogger(__name__)

State = dict[str, np.ndarray]


class ReplyShapeError(ValueError):
    """A reply's adapter tensors do not fit what the server sent."""


def state_to_factors(state: Mapping[str, np.ndarray], scale: float) -> dict[str, aggregation.LoraFactors]:
    """Module -> LoraFactors(A, B, scale) for every LoRA module of an adapter state."""
    modules = sorted({module_of(k) for k in state if is_factor_key(k)})
    return {m: aggregation.LoraFactors(A=state.get(m + FACTOR_A), B=state[m + FACTOR_B], scale=scale)
            for m in modules}


def factors_to_state(factors: Mapping[str, aggregation.LoraFactors], scale: float) -> State:
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
    fitted = aggregation.fit_rank(factors, rank, scale=to_scale)
    out = {k: v for k, v in state.items() if not is_factor_key(k)}
    out.update(factors_to_state(fitted, to_scale))
    return out


def _weighted_mean(arrays: list[np.ndarray], p: np.ndarray) -> np.ndarray:
    return np.tensordot(p, np.stack(arrays).astype(np.float64), axes=1).astype(np.float32)


@dataclass
class Method:
    """FedAvg-style protocol: the global adapter goes out, full adapters come back.

    ``alpha`` is LoRA's alpha (scale of a rank-r adapter is ``alpha / r``); ``rank`` the
    global adapter's rank.
    """

    name: ClassVar[str] = ""
    freeze_a: ClassVar[bool] = False  # clients train B only
    allows_rank_change: ClassVar[bool] = True  # clients may train their own rank
    # int8/int4 error feedback pays where what is sent accumulates (a client starts from
    # the broadcast, the server's global from the replies); not where each round starts over.
    wire_feedback: ClassVar[bool] = True
    # The new global adapter is a weighted mean of the tensors clients send (what a
    # noised mean, user-level DP, can release in its place).
    linear: ClassVar[bool] = True
    alpha: float = 16.0
    rank: int = 8
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Subclasses set up the state they carry across rounds here."""

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
        merged = aggregation.aggregate(self.name, updates, weights, **self._options(global_state))
        if any(f.rank != self.rank for f in merged.values()):
            merged = aggregation.fit_rank(merged, self.rank)
        p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        out = {k: _weighted_mean([r[k] for r in replies], p)
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


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, *, alpha: float, rank: int, **options: Any) -> Method:
    """The protocol object of aggregator ``name``."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r} (known: {', '.join(sorted(METHODS))})") from None
    return cls(alpha=alpha, rank=rank, options=dict(options))
