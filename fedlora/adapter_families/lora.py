"""LoRA: each adapted layer adds ``alpha/r * B @ A``; a site sends ``A`` and ``B``.

The update is a product of what is sent, so the mean of the sites' factors is not the mean
of their updates (:mod:`fedlora.aggregation` has aggregators that handle that product). It
takes every ``lora-init``.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig

from ..adapters import FACTOR_A, FACTOR_B
from .base import AdapterFamily, register
from .inits import INITS, peft_init

__all__ = ["LoraFamily", "lora_config"]


def lora_config(spec: Any, *, modules_to_save: list[str] | None, task_type: str | None,
                use_dora: bool = False) -> LoraConfig:
    """peft's LoraConfig for ``spec`` (with DoRA's magnitude when ``use_dora``)."""
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        modules_to_save=modules_to_save,
        task_type=task_type,
        init_lora_weights=peft_init(spec.init),
        use_dora=use_dora,
    )


@register
class LoraFamily(AdapterFamily):
    """Low-rank factors ``A`` (r x d_in) and ``B`` (d_out x r) per adapted layer."""

    name = "lora"
    sends = (FACTOR_A, FACTOR_B)
    markers = ("lora_A", "lora_B")
    low_rank = True
    exact_mean = False
    exactness = ("the update B @ A is a product of two sent factors: mean(B) @ mean(A) "
                 "differs from mean(B @ A)")
    per_example_gradients = True
    inits = tuple(INITS)

    @classmethod
    def peft_config(cls, spec: Any, *, modules_to_save: list[str] | None,
                    task_type: str | None) -> LoraConfig:
        return lora_config(spec, modules_to_save=modules_to_save, task_type=task_type)
