"""FedSA-LoRA: ``A`` is shared and averaged on the server, ``B`` stays on each client."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .fedavg import average_factors
from .registry import register
from .types import LoraFactors
from .validation import PreparedUpdates

__all__ = ["fedsa"]


@register("fedsa")
def fedsa(
    prepared: PreparedUpdates,
    p: np.ndarray,
    *,
    scale: Optional[float] = None,
    alpha: Optional[float] = None,
) -> Dict[str, LoraFactors]:
    """FedSA-LoRA aggregation: the returned ``A`` is the weighted average of the ``A_k``.

    In FedSA-LoRA only ``A`` is communicated back: every client keeps its own
    ``B_k`` and loads just the averaged ``A``. The returned ``B`` is the
    FedAvg-style ``(sum_k p_k s_k B_k) / s_out`` (zero-padded to the max rank),
    meant for the server's global model and its evaluation, not for clients.
    Options ``scale``/``alpha`` as in ``fedavg``.
    """
    return average_factors(prepared, p, scale=scale, alpha=alpha)
