"""FedAvg (FedIT) with HetLoRA rank fitting: the plain :class:`Method` protocol."""

from __future__ import annotations

from .base import Method, register_method


@register_method
class FedAvgMethod(Method):
    """A and B averaged separately (inexact); heterogeneous ranks zero-padded (HetLoRA)."""

    name = "fedavg"
