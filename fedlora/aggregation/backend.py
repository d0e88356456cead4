"""Conversion between numpy arrays and torch tensors.

The aggregation methods compute in numpy ``float64``. Inputs may be numpy arrays
or torch tensors (any device, any floating dtype); outputs are converted back to
the kind, dtype and device of the inputs. torch is never imported here: a value
can only be a tensor if the caller already imported torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

from .types import Array

__all__ = ["OutputSpec", "as_float64", "is_torch", "to_numpy"]


def _torch() -> Optional[Any]:
    return sys.modules.get("torch")


def is_torch(x: Any) -> bool:
    """True when ``x`` is a ``torch.Tensor`` (without importing torch)."""
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def to_numpy(x: Array) -> np.ndarray:
    """Return ``x`` as a numpy array of a floating dtype, copying only when needed.

    torch tensors are detached and moved to the CPU; ``bfloat16`` (which numpy
    lacks) becomes ``float32``. Integer and boolean input becomes ``float64``.
    Complex input is rejected with ``TypeError``.
    """
    if is_torch(x):
        torch = _torch()
        t = x.detach()
        if t.is_complex():
            raise TypeError("complex tensors are not supported")
        if t.dtype == torch.bfloat16 or not t.is_floating_point():
            t = t.to(torch.float32 if t.dtype == torch.bfloat16 else torch.float64)
        return t.cpu().numpy()
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        raise TypeError("complex arrays are not supported")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    return arr


def as_float64(x: Array) -> np.ndarray:
    """Return ``x`` as a numpy ``float64`` array (no copy if it already is one)."""
    return to_numpy(x).astype(np.float64, copy=False)


def _numpy_float_dtype(x: Any) -> np.dtype:
    """Floating numpy dtype that represents ``x``'s dtype."""
    if is_torch(x):
        torch = _torch()
        mapping = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
        return np.dtype(mapping.get(x.dtype, np.float32 if x.dtype == torch.bfloat16 else np.float64))
    dtype = np.asarray(x).dtype
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _torch_float_dtype(x: Any) -> Any:
    """Floating torch dtype that represents ``x``'s dtype."""
    torch = _torch()
    if is_torch(x):
        return x.dtype if x.is_floating_point() else torch.float64
    mapping = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}
    return mapping.get(_numpy_float_dtype(x), torch.float64)


@dataclass(frozen=True)
class OutputSpec:
    """Kind (``"numpy"`` or ``"torch"``), dtype and device of an output array."""

    kind: str
    dtype: Any
    device: Any = None

    @classmethod
    def infer(cls, reference: Array, arrays: Iterable[Array]) -> "OutputSpec":
        """Spec whose kind/device follow ``reference`` and whose dtype is the
        promotion of the dtypes of ``arrays`` (float32 in -> float32 out)."""
        arrays = [a for a in arrays if a is not None]
        if is_torch(reference):
            torch = _torch()
            dtype = _torch_float_dtype(reference)
            for a in arrays:
                dtype = torch.promote_types(dtype, _torch_float_dtype(a))
            return cls("torch", dtype, reference.device)
        dtype = np.result_type(_numpy_float_dtype(reference), *[_numpy_float_dtype(a) for a in arrays])
        return cls("numpy", dtype)

    def convert(self, arr: Optional[np.ndarray]) -> Optional[Array]:
        """Convert a numpy array to this spec (``None`` passes through)."""
        if arr is None:
            return None
        if self.kind == "torch":
            torch = _torch()
            t = torch.from_numpy(np.ascontiguousarray(arr))
            return t.to(device=self.device, dtype=self.dtype)
        return np.asarray(arr).astype(self.dtype, copy=False)
