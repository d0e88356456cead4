"""FedSA-LoRA (``fedsa``): ``A`` is shared, each client keeps its own ``B``.

Clients send ``A``, ``B`` and the head; the server averages them. It broadcasts only the
averaged ``A`` and head: a client trains on the shared ``A`` with its own ``B`` (zero at
first, then the one it released last), so ``B`` personalises each site. The server's
global ``B``, the average of the clients' ``B`` factors, serves its own evaluation and the
exported adapter only.

The server's math is FedAvg's, :func:`~fedlora.aggregation.fedavg.fedavg`; only the
protocol around it differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from ..adapters import FACTOR_B, load_adapter_state
from .base import Method, register
from .fedavg import fedavg
from .stack import fresh_adapter
from .states import ReplyShapeError, State

__all__ = ["FedSaMethod"]


@register
class FedSaMethod(Method):
    """FedSA-LoRA: ``A`` and the head averaged and sent; ``B`` stays with each client."""

    name = "fedsa"
    combine = staticmethod(fedavg)  # A and B averaged as FedAvg does; only A goes out
    allows_rank_change = False  # one shared A for every client

    def payload(self, global_state: State) -> State:
        return {k: v for k, v in global_state.items() if not k.endswith(FACTOR_B)}

    def evaluation_state(self, global_state: State) -> State:
        return dict(global_state)  # the server evaluates with the averaged B

    def personal_keys(self, state: Mapping[str, Any]) -> set[str]:
        return {k for k in state if k.endswith(FACTOR_B)}

    def load(self, model: nn.Module, payload: State, *, client_rank: int) -> None:
        """The shared tensors from ``payload``; ``B`` from it if given (the server's
        evaluation), else zero as initialised (a client then loads its own over it)."""
        if client_rank != self.rank:
            raise ReplyShapeError(f"FedSA-LoRA needs every client at the global rank "
                                  f"{self.rank}; this site asks for lora-rank {client_rank}")
        fresh = fresh_adapter(model)
        load_adapter_state(model, {**{k: v for k, v in fresh.items() if k.endswith(FACTOR_B)},
                                   **payload})

    def start_state(self, global_state: State, *, rank: int) -> State:
        return self.payload(global_state)

    def update_norm(self, reply: State, global_state: State, *, rank: int) -> float:
        """L2 norm of the change to the shared tensors (a client's own ``B`` starts where
        only it knows; it reaches other clients through nothing)."""
        start = self.start_state(global_state, rank=rank)
        total = sum(float(np.sum((v.astype(np.float64) - start[k]) ** 2))
                    for k, v in reply.items() if k in start)
        return float(np.sqrt(total))
