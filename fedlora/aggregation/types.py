"""Core types of the aggregation library: LoRA factors, errors and aliases."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    import torch

    Array = Union[np.ndarray, torch.Tensor]
else:
    Array = Any

__all__ = [
    "AggregationError",
    "Array",
    "LoraFactors",
    "ModuleFactors",
    "Updates",
]


class AggregationError(ValueError):
    """Raised when client updates cannot be aggregated (bad shapes, values, keys...).

    Subclasses :class:`ValueError` so callers that only catch ``ValueError`` still
    see it; the message names the client index and the module where possible.
    """


@dataclass(frozen=True, eq=False)
class LoraFactors:
    """Low-rank factors of one LoRA module.

    The dense update represented is ``dW = scale * B @ A`` with

    * ``A``: ``(r, d_in)`` down-projection (may be ``None`` for methods such as
      FFA-LoRA where ``A`` is frozen and never transmitted),
    * ``B``: ``(d_out, r)`` up-projection,
    * ``scale``: the LoRA scaling ``alpha / r``.

    ``A`` and ``B`` may be numpy arrays or torch tensors.
    """

    A: Optional[Array]
    B: Array
    scale: float = 1.0

    def __post_init__(self) -> None:
        try:
            scale = float(self.scale)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"LoraFactors.scale must be a real number, got {self.scale!r}") from exc
        object.__setattr__(self, "scale", scale)

    @property
    def rank(self) -> int:
        """LoRA rank ``r`` (number of columns of ``B``)."""
        return int(self.B.shape[1])

    @property
    def d_out(self) -> int:
        """Output dimension (rows of ``B``)."""
        return int(self.B.shape[0])

    @property
    def d_in(self) -> Optional[int]:
        """Input dimension (columns of ``A``), ``None`` when ``A`` is absent."""
        return None if self.A is None else int(self.A.shape[1])

    @property
    def alpha(self) -> float:
        """The LoRA ``alpha`` implied by ``scale = alpha / r``."""
        return self.scale * self.rank

    def replace(self, **changes: Any) -> "LoraFactors":
        """Return a copy with some fields replaced."""
        values = {"A": self.A, "B": self.B, "scale": self.scale}
        values.update(changes)
        return LoraFactors(**values)


def is_finite_scale(scale: float) -> bool:
    """True when ``scale`` is a finite, strictly positive number."""
    return math.isfinite(scale) and scale > 0.0


# One mapping per client: module name -> factors.
ModuleFactors = Mapping[str, LoraFactors]
Updates = Sequence[ModuleFactors]
