"""Federated LoRA methods: what the server sends, how a client loads it, how replies merge.

Each method of :mod:`fedlora.aggregation` needs a little protocol around the pure
aggregation: FFA-LoRA never sends ``A``; FLoRA (``stack``) sends the exact global update
as stacked factors that clients fold into their frozen base weights before restarting
LoRA; heterogeneous ranks are fitted on arrival. This module holds that protocol as a
registry of :class:`Method` objects, so the server and client glue has no if-chains.

Adapter states are ``{peft key: float32 ndarray}`` (see :mod:`fedlora.adapters`); a
client's own LoRA scale is ``alpha / r_k``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from . import aggregation
from .adapters import FACTOR_A, FACTOR_B, adapter_state, is_factor_key, load_adapter_state, module_of

__all__ = ["Method", "METHODS", "get_method", "state_to_factors", "factors_to_state",
           "refit_state", "ReplyShapeError"]

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


@register_method
class FedAvgMethod(Method):
    """A and B averaged separately (inexact); heterogeneous ranks zero-padded (HetLoRA)."""

    name = "fedavg"


@register_method
class SvdMethod(Method):
    """The exact weighted sum of client products B_k A_k, re-factorised to rank r (optimal),
    with the truncation residual optionally fed back into the next round."""

    name = "svd"

    def __post_init__(self) -> None:
        self.feedback = (aggregation.SvdErrorFeedback()
                         if self.options.get("error_feedback") else None)

    def checkpoint_state(self) -> tuple[State, dict[str, Any]]:
        if self.feedback is None:
            return {}, {}
        sd = self.feedback.state_dict()
        arrays = {f"residual/{m}/{which}": pair[which]
                  for m, pair in sd.pop("residuals").items() for which in ("A", "B")}
        return arrays, sd

    def restore_state(self, arrays: Mapping[str, np.ndarray], values: Mapping[str, Any]) -> None:
        if self.feedback is None:
            super().restore_state(arrays, values)
            return
        residuals: dict[str, dict[str, np.ndarray]] = {}
        for key, a in arrays.items():
            module, which = key[len("residual/"):].rsplit("/", 1)
            residuals.setdefault(module, {})[which] = a
        self.feedback.load_state_dict({**values, "residuals": residuals})

    def _options(self, global_state: State) -> dict[str, Any]:
        opts: dict[str, Any] = {"scale": self.scale, "rank": self.rank}
        if self.feedback is not None:
            opts.update(error_feedback=True, state=self.feedback)
        return opts


@register_method
class FfaMethod(Method):
    """FFA-LoRA: A frozen at the shared seeded initialisation and never sent; B averaged."""

    name = "ffa"
    freeze_a = True
    allows_rank_change = False

    def payload(self, global_state: State) -> State:
        return {k: v for k, v in global_state.items() if not k.endswith(FACTOR_A)}

    def aggregate(self, replies: list[State], weights: list[int], global_state: State) -> State:
        shared_a = {module_of(k): v for k, v in global_state.items() if k.endswith(FACTOR_A)}
        full = [dict(r, **{m + FACTOR_A: a for m, a in shared_a.items()}) for r in replies]
        updates = [state_to_factors(r, self.scale) for r in full]
        merged = aggregation.aggregate("ffa", updates, weights, shared_A=shared_a,
                                       scale=self.scale)
        p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        out = dict(global_state)
        out.update({k: _weighted_mean([r[k] for r in replies], p)
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


@register_method
class StackMethod(Method):
    """FLoRA: exact stacking. The server keeps the global update as stacked factors
    (rank grows by sum r_k each round) and sends them; clients fold them into their frozen
    base weights and train a fresh LoRA adapter on top."""

    name = "stack"

    def __post_init__(self) -> None:
        # module -> (B_cum (d_out, R), A_cum (R, d_in)), scale 1: the global update so far.
        self.cumulative: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def checkpoint_state(self) -> tuple[State, dict[str, Any]]:
        arrays = {}
        for m, (b, a) in self.cumulative.items():
            arrays[f"cumulative/{m}/B"], arrays[f"cumulative/{m}/A"] = b, a
        return arrays, {}

    def restore_state(self, arrays: Mapping[str, np.ndarray], values: Mapping[str, Any]) -> None:
        pairs: dict[str, dict[str, np.ndarray]] = {}
        for key, a in arrays.items():
            module, which = key[len("cumulative/"):].rsplit("/", 1)
            pairs.setdefault(module, {})[which] = np.asarray(a, np.float32)
        self.cumulative = {m: (p["B"], p["A"]) for m, p in pairs.items()}

    def payload(self, global_state: State) -> State:
        out = {k: v for k, v in global_state.items() if not is_factor_key(k)}
        for m, (b, a) in self.cumulative.items():
            out[m + FACTOR_A] = a
            out[m + FACTOR_B] = b
        return out

    def aggregate(self, replies: list[State], weights: list[int], global_state: State) -> State:
        updates = [state_to_factors(r, self.alpha / (state_rank(r) or self.rank)) for r in replies]
        merged = aggregation.aggregate("stack", updates, weights, scale=1.0)
        for m, f in merged.items():
            b, a = np.asarray(f.B, np.float32), np.asarray(f.A, np.float32)
            if m in self.cumulative:
                b0, a0 = self.cumulative[m]
                b, a = np.concatenate([b0, b], axis=1), np.concatenate([a0, a], axis=0)
            self.cumulative[m] = (b, a)
        p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        out = dict(global_state)
        out.update({k: _weighted_mean([r[k] for r in replies], p)
                    for k in replies[0] if not is_factor_key(k)})
        return out

    def export(self, global_state: State) -> tuple[int, float, State]:
        # The global update is base + B_cum @ A_cum (scale 1): a rank-R adapter, alpha = R.
        state = {k: v for k, v in global_state.items() if not is_factor_key(k)}
        if not self.cumulative:
            return self.rank, self.alpha, global_state
        total = next(iter(self.cumulative.values()))[0].shape[1]
        for m, (b, a) in self.cumulative.items():
            state[m + FACTOR_A], state[m + FACTOR_B] = a, b
        return total, float(total), state

    def start_state(self, global_state: State, *, rank: int) -> State:
        # Clients restart from a fresh adapter: B = 0, A at the client's own seeded
        # initialisation (not known here for other ranks), the head from the server.
        return {k: v for k, v in global_state.items() if not is_factor_key(k)}

    def update_norm(self, reply: State, global_state: State, *, rank: int) -> float:
        """Norm of the trained B factors (they start at zero) and of the head's change."""
        start = self.start_state(global_state, rank=rank)
        total = 0.0
        for k, v in reply.items():
            if k.endswith(FACTOR_A):
                continue
            d = v.astype(np.float64) - start.get(k, 0.0)
            total += float(np.sum(d * d))
        return float(np.sqrt(total))

    def load(self, model: nn.Module, payload: State, *, client_rank: int) -> None:
        fold_update(model, {k: v for k, v in payload.items() if is_factor_key(k)})
        fresh = fresh_adapter(model)
        fresh.update({k: v for k, v in payload.items() if not is_factor_key(k)})
        load_adapter_state(model, fresh)


# Kept on the model object itself (not in a table keyed by id(), which Python reuses
# after a model is freed): its pretrained base weights before any fold, and its fresh
# adapter (the seeded initialisation each FLoRA round restarts from).
_BASE_ATTR = "_fedlora_pretrained_weights"
_FRESH_ATTR = "_fedlora_fresh_adapter"


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    inner = getattr(model, "_module", model)
    return {name: mod for name, mod in inner.named_modules()
            if hasattr(mod, "lora_A") and hasattr(mod, "base_layer")}


def fresh_adapter(model: nn.Module) -> State:
    """The adapter state the model had when first seen here (its seeded initialisation)."""
    if not hasattr(model, _FRESH_ATTR):
        object.__setattr__(model, _FRESH_ATTR, adapter_state(model))
    return {k: v.copy() for k, v in getattr(model, _FRESH_ATTR).items()}


def fold_update(model: nn.Module, stacked: Mapping[str, np.ndarray]) -> None:
    """Set each LoRA-wrapped base weight to W0 + B_cum @ A_cum (scale 1), W0 the pretrained
    weight. Modules without stacked factors go back to W0.

    Module names from ``named_modules`` of a PeftModel ('base_model.model.<path>') are
    the prefixes of peft's state-dict keys, so they index ``stacked`` directly.
    """
    layers = _lora_layers(model)
    if not hasattr(model, _BASE_ATTR):
        object.__setattr__(model, _BASE_ATTR, {})
    base: dict[str, torch.Tensor] = getattr(model, _BASE_ATTR)
    fresh_adapter(model)  # remember the initial adapter before anything changes
    for name, layer in layers.items():
        w = layer.base_layer.weight
        if name not in base:
            base[name] = w.detach().clone()
        a, b = stacked.get(name + FACTOR_A), stacked.get(name + FACTOR_B)
        with torch.no_grad():
            if a is None or b is None:
                w.copy_(base[name])
            else:
                delta = torch.from_numpy(np.asarray(b, np.float32)) @ torch.from_numpy(
                    np.asarray(a, np.float32))  # (d_out, R) @ (R, d_in)
                w.copy_(base[name] + delta.to(w.device, w.dtype))


def get_method(name: str, *, alpha: float, rank: int, **options: Any) -> Method:
    """The protocol object of aggregator ``name``."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r} (known: {', '.join(sorted(METHODS))})") from None
    return cls(alpha=alpha, rank=rank, options=dict(options))
