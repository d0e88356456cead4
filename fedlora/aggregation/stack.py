"""FLoRA (``stack``): exact aggregation by concatenating client factors.

The server keeps the exact global update as stacked factors, which clients fold into
their frozen base weights before training a fresh LoRA adapter on top.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..adapters import FACTOR_A, FACTOR_B, adapter_state, is_factor_key, load_adapter_state
from .base import Method, aggregate, register
from .linalg import stack_factors
from .states import State, state_rank, state_to_factors, weighted_mean
from .types import LoraFactors
from .validation import PreparedUpdates, resolve_scale

__all__ = ["StackMethod", "fold_update", "fresh_adapter", "stack"]


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


@register
class StackMethod(Method):
    """FLoRA: exact stacking. The server keeps the global update as stacked factors
    (rank grows by sum r_k each round) and sends them; clients fold them into their frozen
    base weights and train a fresh LoRA adapter on top."""

    name = "stack"
    combine = staticmethod(stack)
    linear = False  # every client's own factors, concatenated
    # The server's stacked factors are exact and clients refold them from scratch each
    # round, and each round's reply is a fresh adapter: rounding residuals have nothing to
    # correct in either direction.
    wire_feedback = False

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
        merged = aggregate(self.name, updates, weights, scale=1.0)
        for m, f in merged.items():
            b, a = np.asarray(f.B, np.float32), np.asarray(f.A, np.float32)
            if m in self.cumulative:
                b0, a0 = self.cumulative[m]
                b, a = np.concatenate([b0, b], axis=1), np.concatenate([a0, a], axis=0)
            self.cumulative[m] = (b, a)
        p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        out = dict(global_state)
        out.update({k: weighted_mean([r[k] for r in replies], p)
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
