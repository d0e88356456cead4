"""Adapter tensors in and out of a peft model, keyed by peft's portable state-dict names.

``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` are the one path in and
out of a model; everything else works on plain ``{name: ndarray}`` mappings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

__all__ = [
    "FACTOR_A",
    "FACTOR_B",
    "adapter_parameters",
    "adapter_state",
    "load_adapter_state",
    "is_factor_key",
    "module_of",
    "FactorLayout",
    "factor_layout",
    "analytic_bytes",
]

FACTOR_A = ".lora_A.weight"  # (r, d_in)
FACTOR_B = ".lora_B.weight"  # (d_out, r)


def _unwrap(model: nn.Module) -> nn.Module:
    # Opacus' GradSampleModule keeps the wrapped model in ``_module``.
    return getattr(model, "_module", model)


def adapter_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The adapter tensors of a peft model (LoRA factors and any trained head), as float32."""
    sd = get_peft_model_state_dict(_unwrap(model))
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in sd.items()}


def adapter_parameters(model: nn.Module, keys: list[str]) -> list[nn.Parameter]:
    """The model's parameters behind the adapter keys ``keys``, in that order: each key's
    tensor in peft's state dict shares its parameter's storage."""
    sd = get_peft_model_state_dict(_unwrap(model))
    by_storage = {p.data_ptr(): p for p in model.parameters()}
    missing = [k for k in keys if k not in sd or sd[k].data_ptr() not in by_storage]
    if missing:
        raise ValueError(f"cannot match adapter keys {missing[:3]} to the model's parameters")
    return [by_storage[sd[k].data_ptr()] for k in keys]


def load_adapter_state(model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Load adapter tensors into a peft model; every adapter tensor must be given, no other.

    Raises ``KeyError`` naming missing or unexpected keys and ``ValueError`` naming a
    tensor whose shape does not match.
    """
    inner = _unwrap(model)
    expected = get_peft_model_state_dict(inner)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"adapter keys do not match the model: missing {missing[:3]}"
                       f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                       f"{'...' if len(unexpected) > 3 else ''}")
    tensors = {}
    for k, ref in expected.items():
        t = torch.as_tensor(np.asarray(state[k]) if not torch.is_tensor(state[k]) else state[k])
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"adapter tensor '{k}' has shape {tuple(t.shape)}, "
                             f"expected {tuple(ref.shape)}")
        tensors[k] = t.to(ref.device, ref.dtype)
    set_peft_model_state_dict(inner, tensors)


def state_digest(state: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 of named arrays (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for k in sorted(state):
        a = np.ascontiguousarray(state[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.digest()


def is_factor_key(key: str) -> bool:
    """True for a LoRA A or B factor key."""
    return key.endswith(FACTOR_A) or key.endswith(FACTOR_B)


def module_of(key: str) -> str:
    """The LoRA module a factor key belongs to (``...query.lora_A.weight`` -> ``...query``)."""
    for suffix in (FACTOR_A, FACTOR_B):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise ValueError(f"'{key}' is not a LoRA factor key")


@dataclass(frozen=True)
class FactorLayout:
    """Shapes of one LoRA module: A is (rank, d_in), B is (d_out, rank)."""

    rank: int
    d_in: int
    d_out: int

    @property
    def numel(self) -> int:
        return self.rank * (self.d_in + self.d_out)


def factor_layout(state: Mapping[str, np.ndarray]) -> dict[str, FactorLayout]:
    """Per LoRA module, the rank and dimensions found in an adapter state."""
    out: dict[str, FactorLayout] = {}
    for key, arr in state.items():
        if key.endswith(FACTOR_A):
            b = state.get(key[: -len(FACTOR_A)] + FACTOR_B)
            if b is None:
                raise KeyError(f"'{key}' has no matching B factor")
            r, d_in = np.shape(arr)
            d_out, r_b = np.shape(b)
            if r != r_b:
                raise ValueError(f"module '{module_of(key)}': A has rank {r}, B has rank {r_b}")
            out[module_of(key)] = FactorLayout(rank=r, d_in=d_in, d_out=d_out)
    return out


def analytic_bytes(layout: Mapping[str, FactorLayout], dtype_size: int) -> int:
    """Bytes of all LoRA factors: sum over modules of rank x (d_in + d_out) x dtype size."""
    return sum(m.numel for m in layout.values()) * dtype_size
