"""DoRA (weight-decomposed LoRA): LoRA's factors plus a magnitude vector per layer.

A layer's weight becomes ``m * (W + s B A) / ||W + s B A||`` (the norm per output row), so a
site sends ``A``, ``B`` and ``m`` (``lora_magnitude_vector``). The magnitude is not a
low-rank factor: aggregators whose math needs every sent tensor to be ``A`` or ``B`` refuse
the family, and plain averaging (``fedavg``) averages the three separately, which is not the
mean of the sites' updates. ``m`` starts at the row norms of the base weights, the same at
every party.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig

from ..adapters import FACTOR_A, FACTOR_B
from .base import AdapterFamily, register
from .lora import lora_config

__all__ = ["DoraFamily", "MAGNITUDE"]

MAGNITUDE = ".lora_magnitude_vector"  # (d_out,)


@register
class DoraFamily(AdapterFamily):
    """LoRA factors and DoRA's per-row magnitude."""

    name = "dora"
    sends = (FACTOR_A, FACTOR_B, MAGNITUDE)
    markers = ("lora_A", "lora_B", "lora_magnitude_vector")
    low_rank = False
    exact_mean = False
    exactness = ("the update is normalised by the row norms of W + s B A and scaled by the "
                 "sent magnitude: neither the product nor the norm is linear in what is sent")
    inits = ("default", "gaussian")

    @classmethod
    def peft_config(cls, spec: Any, *, modules_to_save: list[str] | None,
                    task_type: str | None) -> LoraConfig:
        return lora_config(spec, modules_to_save=modules_to_save, task_type=task_type,
                           use_dora=True)
