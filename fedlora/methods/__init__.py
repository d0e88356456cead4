"""Federated LoRA methods: what the server sends, how a client loads it, how replies merge.

Each method of :mod:`fedlora.aggregation` needs a little protocol around the pure
aggregation: FFA-LoRA never sends ``A``; FLoRA (``stack``) sends the exact global update
as stacked factors that clients fold into their frozen base weights before restarting
LoRA; heterogeneous ranks are fitted on arrival. This package holds that protocol as a
registry of :class:`Method` objects, so the server and client glue has no if-chains:

* :mod:`.base` - the FedAvg-style :class:`Method`, the ``METHODS`` registry,
  :func:`get_method` and the adapter-state helpers;
* :mod:`.fedavg`, :mod:`.svd`, :mod:`.ffa`, :mod:`.stack`, :mod:`.fedsa` - one method each.

Adapter states are ``{peft key: float32 ndarray}`` (see :mod:`fedlora.adapters`); a
client's own LoRA scale is ``alpha / r_k``.
"""

from __future__ import annotations

from .base import (METHODS, Method, ReplyShapeError, State, _weighted_mean, factors_to_state,
                   get_method, refit_state, register_method, state_rank, state_to_factors)

# Importing the method modules registers them; this order is the order of METHODS.
from .fedavg import FedAvgMethod  # isort: skip
from .svd import SvdMethod  # isort: skip
from .ffa import FfaMethod  # isort: skip
from .stack import (_BASE_ATTR, _FRESH_ATTR, StackMethod, _lora_layers,  # isort: skip
                    fold_update, fresh_adapter)
from .fedsa import FedSaMethod  # isort: skip

__all__ = ["Method", "METHODS", "get_method", "state_to_factors", "factors_to_state",
           "refit_state", "ReplyShapeError"]
