"""Which run-configs a family can run in: its aggregator, ``lora-init``, DP mode and secure
aggregation, checked before round 1 with errors naming the key and the tensors at issue.

An aggregator declares ``factors_only`` (:class:`fedlora.aggregation.Method`): its math
reads every sent tensor other than a head as LoRA's ``A`` or ``B``. Such an aggregator
cannot take a family that sends other tensors (DoRA's magnitude, VeRA's vectors); ``fedavg``
averages those elementwise, as it does a head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..adapters import FACTOR_A, FACTOR_B
from ..config import ConfigError
from .base import AdapterFamily, available_families, get_family
from .inits import derives_base

if TYPE_CHECKING:
    from ..run_config import RunConfig

__all__ = ["check_config", "other_tensors"]


def other_tensors(family: type[AdapterFamily]) -> list[str]:
    """The key patterns a family sends besides LoRA's factors (``*.vera_lambda_b``, ...)."""
    return [f"*{s}" for s in family.sends if s not in (FACTOR_A, FACTOR_B)]


def check_config(cfg: RunConfig, methods: Mapping[str, Any]) -> None:
    """``ConfigError`` for a run-config whose adapter family does not fit its ``lora-init``,
    its aggregator (``methods``: the registered aggregators), its DP mode or secure
    aggregation."""
    try:
        family = get_family(cfg.adapter)
    except ValueError:
        raise ConfigError("adapter", cfg.adapter,
                          f"one of {', '.join(available_families())}") from None
    if cfg.lora_init not in family.inits:
        raise ConfigError("lora-init", cfg.lora_init,
                          f"one of {', '.join(family.inits)} with adapter = '{family.name}'")
    others = other_tensors(family)
    method = methods.get(cfg.aggregator)
    if others and method is not None and getattr(method, "factors_only", True):
        accepting = [n for n, m in methods.items() if not getattr(m, "factors_only", True)]
        raise ConfigError(
            "aggregator", cfg.aggregator,
            f"one of {', '.join(accepting)} with adapter = '{family.name}': '{cfg.aggregator}' "
            f"reads every sent tensor as LoRA's A or B, and '{family.name}' also sends "
            f"{', '.join(others)}")
    if derives_base(cfg.lora_init) and cfg.aggregator == "stack":
        raise ConfigError("lora-init", cfg.lora_init,
                          "default or gaussian with aggregator = 'stack' (its sites fold the "
                          "stacked update into their base weights; a base derived by the init "
                          "is not supported there yet)")
    if "sample" in cfg.dp_mode.split("+") and not family.per_example_gradients:
        supported = [n for n in available_families() if get_family(n).per_example_gradients]
        raise ConfigError(
            "adapter", family.name,
            f"one of {', '.join(supported)} with dp-mode = '{cfg.dp_mode}': Opacus computes no "
            f"per-example gradients of {', '.join(others)} ('{family.name}' layers), which "
            "DP-SGD clips")
    if others and cfg.secure_aggregation and cfg.dp_mode == "sample":
        raise ConfigError(
            "adapter", family.name,
            "lora with secure-aggregation = true and dp-mode = 'sample': the distributed DP "
            f"step sums every sent tensor other than A and B as the head's, and "
            f"'{family.name}' also sends {', '.join(others)}")
