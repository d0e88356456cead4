"""FFA-LoRA: clients train and send ``B`` only, ``A`` stays at its seeded initialisation."""

from __future__ import annotations

import numpy as np
from torch import nn

from .. import aggregation
from ..adapters import FACTOR_A, adapter_state, is_factor_key, load_adapter_state, module_of
from .base import (Method, ReplyShapeError, State, _weighted_mean, factors_to_state, register_method,
                   state_to_factors)


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
