"""The aggregators of federated LoRA updates: each one's math and the protocol around it.

Averaging the ``A`` and ``B`` factors separately (FedIT) is not the average of
the client updates: ``mean(B) @ mean(A) != mean(B @ A)``. This package offers
several aggregation rules behind one entry point::

    from fedlora.aggregation import LoraFactors, aggregate

    global_factors = aggregate("svd", updates, weights, rank=8)

``updates`` holds one mapping per client, module name -> :class:`LoraFactors`
(``A``: ``(r, d_in)``, ``B``: ``(d_out, r)``, ``scale = alpha / r``); the
update of client ``k`` on a module is ``dW_k = s_k * B_k @ A_k``. ``weights``
are per-client example counts, normalised to ``p_k``. numpy arrays and torch
tensors are both accepted; the result has the kind, device and dtype of the
input (computation is in float64).

Methods (see :func:`available_methods`):

* ``fedavg`` - ``A`` and ``s_k B`` averaged separately (inexact baseline;
  heterogeneous ranks zero-padded to the max rank).
* ``ffa`` - FFA-LoRA: ``A`` frozen and shared, only ``B`` averaged (exact).
* ``stack`` - FLoRA: factors concatenated, rank ``sum_k r_k`` (exact).
* ``svd`` - exact sum re-factorised to rank ``r`` by a factored SVD
  (Eckart-Young optimal), optionally with error feedback across rounds.
* ``fedsa`` - FedSA-LoRA: ``A`` averaged and shared, ``B`` kept by clients.

Output scale conventions (every method also accepts ``scale=`` to set the
output scale explicitly, or ``alpha=`` for ``alpha / r_out``; only the product
``scale * B @ A`` is meaningful, and it does not depend on this choice):

* ``fedavg`` / ``fedsa``: rank ``r_max``; ``scale = alpha_bar / r_max`` with
  ``alpha_bar = sum_k p_k s_k r_k`` (the common alpha if all clients share it);
  client scales are folded into ``B`` before averaging.
* ``ffa``: rank ``r``; ``scale = sum_k p_k s_k`` (the common scale if shared).
* ``stack``: rank ``sum_k r_k``; ``scale = 1.0``, weights and client scales
  folded into the stacked ``A``.
* ``svd``: rank ``r`` (default max client rank); ``scale = alpha_bar / r``;
  balanced factors ``B = U sqrt(S / scale)``, ``A = sqrt(S / scale) V^T``.

Each aggregator is one module here: its math, a pure function (arrays in, arrays out),
and its protocol, a :class:`Method` subclass naming that function as ``combine`` and
saying what the server sends, how a client loads it and how replies are checked and
merged (FFA-LoRA never sends ``A``; FLoRA's clients fold the stacked global update into
their base weights; heterogeneous ranks are fitted on arrival). The class is registered
once with :func:`register`; :func:`aggregate` and :func:`get_method` (the protocol
object for a run) read that one registry, ``METHODS``. Shared helpers: :mod:`.base`
(``Method``, the registry, :func:`aggregate`), :mod:`.states` (adapter states to and
from factors), :mod:`.validation`, :mod:`.linalg`, :mod:`.ops`, :mod:`.types` and
:mod:`.backend` (numpy/torch conversion).

A new aggregator is one module defining its function and its registered ``Method``
subclass, plus one import line below.
"""

from .base import METHODS, AggregationFn, Method, aggregate, available_methods, get_method, register
from .linalg import ProductSVD, product_norm, product_svd, stack_factors
from .ops import delta_weight, fit_rank, product_error
from .states import (
                     ReplyShapeError,
                     State,
                     factors_to_state,
                     refit_state,
                     state_rank,
                     state_to_factors,
)
from .types import AggregationError, Array, LoraFactors, ModuleFactors, Updates
from .validation import PreparedUpdates, normalize_weights

# Importing the aggregator modules registers them; this order is the order of METHODS.
from . import fedavg as _fedavg  # noqa: E402,F401  isort: skip
from . import svd as _svd  # noqa: E402,F401  isort: skip
from . import ffa as _ffa  # noqa: E402,F401  isort: skip
from . import stack as _stack  # noqa: E402,F401  isort: skip
from . import fedsa as _fedsa  # noqa: E402,F401  isort: skip
from .svd import SvdErrorFeedback, SvdReport  # noqa: E402

__all__ = [
    "METHODS",
    "AggregationError",
    "AggregationFn",
    "Array",
    "LoraFactors",
    "Method",
    "ModuleFactors",
    "PreparedUpdates",
    "ProductSVD",
    "ReplyShapeError",
    "State",
    "SvdErrorFeedback",
    "SvdReport",
    "Updates",
    "aggregate",
    "available_methods",
    "delta_weight",
    "factors_to_state",
    "fit_rank",
    "get_method",
    "normalize_weights",
    "product_error",
    "product_norm",
    "product_svd",
    "refit_state",
    "register",
    "stack_factors",
    "state_rank",
    "state_to_factors",
]
