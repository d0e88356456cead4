"""Factored linear algebra: products ``B @ A`` handled without forming them densely.

Every function here works on numpy ``float64`` and costs ``O((d_in + d_out) R^2)``
for a stacked rank ``R``, never ``O(d_in * d_out)`` memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

from .types import LoraFactors

__all__ = ["ProductSVD", "product_norm", "product_svd", "stack_factors"]

# A factored matrix B @ A given as the pair (B: (d_out, q), A: (q, d_in)).
FactorPair = Tuple[np.ndarray, np.ndarray]


def stack_factors(
    factors: Sequence[LoraFactors],
    coefs: Sequence[float],
    extra: Iterable[Optional[FactorPair]] = (),
) -> FactorPair:
    """Stack client factors so that ``B_stack @ A_stack = sum_k coefs[k] * B_k @ A_k``.

    ``B_stack = [B_1 ... B_K]`` is ``(d_out, R)`` and ``A_stack`` is
    ``[c_1 A_1; ...; c_K A_K]``, ``(R, d_in)`` with ``R = sum_k r_k``. Pairs in
    ``extra`` (already-scaled ``(B, A)``) are appended with coefficient 1.
    Returns float64 arrays; inputs of any floating dtype are cast while copying.
    """
    extra_pairs = [pair for pair in extra if pair is not None]
    blocks = [(f.B, f.A, float(c)) for f, c in zip(factors, coefs)]
    blocks += [(b, a, 1.0) for b, a in extra_pairs]
    if not blocks:
        raise ValueError("nothing to stack")
    d_out = blocks[0][0].shape[0]
    d_in = blocks[0][1].shape[1]
    total = sum(b.shape[1] for b, _, _ in blocks)
    B_stack = np.empty((d_out, total), dtype=np.float64)  # (d_out, R)
    A_stack = np.empty((total, d_in), dtype=np.float64)  # (R, d_in)
    offset = 0
    for b, a, c in blocks:
        r = b.shape[1]
        B_stack[:, offset : offset + r] = b
        rows = A_stack[offset : offset + r]
        rows[...] = a
        if c != 1.0:
            rows *= c
        offset += r
    return B_stack, A_stack


def product_norm(B: np.ndarray, A: np.ndarray) -> float:
    """Frobenius norm of ``B @ A`` (``B``: ``(d_out, q)``, ``A``: ``(q, d_in)``).

    Uses ``B = Q_B R_B`` and ``A^T = Q_A R_A`` so that
    ``||B A||_F = ||R_B R_A^T||_F`` (a ``q x q`` matrix); more accurate than the
    Gram-matrix identity ``trace((B^T B)(A A^T))``, which squares the condition.
    """
    if B.shape[1] == 0:
        return 0.0
    R_B = np.linalg.qr(B, mode="r")  # (min(d_out, q), q)
    R_A = np.linalg.qr(A.T, mode="r")  # (min(d_in, q), q)
    return float(np.linalg.norm(R_B @ R_A.T))


@dataclass
class ProductSVD:
    """Thin SVD ``B @ A = U diag(s) Vt`` kept as ``U = q_left @ u_core``,
    ``Vt = vt_core @ q_right.T``; singular values ``s`` are sorted descending."""

    q_left: np.ndarray  # (d_out, k_B), orthonormal columns
    u_core: np.ndarray  # (k_B, k)
    s: np.ndarray  # (k,)
    vt_core: np.ndarray  # (k, k_A)
    q_right: np.ndarray  # (d_in, k_A), orthonormal columns

    def left(self, start: int, stop: int) -> np.ndarray:
        """Left singular vectors ``start:stop`` as a ``(d_out, stop - start)`` array."""
        return self.q_left @ self.u_core[:, start:stop]

    def right(self, start: int, stop: int) -> np.ndarray:
        """Right singular vectors ``start:stop`` as a ``(stop - start, d_in)`` array."""
        return self.vt_core[start:stop] @ self.q_right.T

    @property
    def noise_floor(self) -> float:
        """Singular values at or below this are numerical noise."""
        if self.s.size == 0:
            return 0.0
        size = max(self.u_core.shape[0], self.vt_core.shape[1])
        return float(self.s[0]) * np.finfo(np.float64).eps * size


def product_svd(B: np.ndarray, A: np.ndarray) -> ProductSVD:
    """Thin SVD of ``B @ A`` without forming it.

    ``B``: ``(d_out, R)``, ``A``: ``(R, d_in)``. Thin QR ``B = Q_B R_B`` and
    ``A^T = Q_A R_A``, then an SVD of the small core ``R_B @ R_A^T``
    (``min(d_out, R) x min(d_in, R)``): ``B A = Q_B (R_B R_A^T) Q_A^T``.
    Cost ``O((d_out + d_in) R^2 + R^3)``.
    """
    Q_B, R_B = np.linalg.qr(B)  # (d_out, k_B), (k_B, R)
    Q_A, R_A = np.linalg.qr(A.T)  # (d_in, k_A), (k_A, R)
    core = R_B @ R_A.T  # (k_B, k_A)
    u, s, vt = np.linalg.svd(core, full_matrices=False)  # (k_B, k), (k,), (k, k_A)
    return ProductSVD(q_left=Q_B, u_core=u, s=s, vt_core=vt, q_right=Q_A)
