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


def _leading_triplets(C: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Leading ``n`` singular triplets of ``C`` (``(k_B, k_A)``, ``n < min(k_B, k_A)``).

    Returns ``(u, s, vt, s_all, tail)``: ``u`` ``(k_B, n)`` and ``vt`` ``(n, k_A)``
    with orthonormal columns/rows, ``s`` ``(n,)`` descending, ``s_all`` estimates
    of all singular values and ``tail = ||C - C_n||_F`` for the rank-``n``
    approximation ``C_n`` described below.

    The eigenvectors of the Gram matrix of ``C`` on its smaller side (``syevd``,
    about half the cost of a full SVD of ``C``) span the leading singular
    subspace on that side; one Rayleigh-Ritz step (QR of ``C V_0`` and an SVD of
    the small ``n x k_A`` projection) then gives triplets with
    ``u^T C = diag(s) vt`` to working precision, so that
    ``C_n = (C vt^T) diag(1/s) (u^T C) = C vt^T vt`` is an orthogonal
    projection of ``C`` (for a wide ``C`` the roles swap: ``C vt^T = u diag(s)``
    and ``C_n = u u^T C``). The trailing entries of ``s_all`` come from the Gram
    eigenvalues (absolute accuracy about ``sqrt(eps) * s_max``); use the full
    SVD when those matter.
    """
    if C.shape[1] > C.shape[0]:
        vt_t, s, u_t, s_all, tail = _leading_triplets(C.T, n)
        return u_t.T, s, vt_t.T, s_all, tail
    lam, W = np.linalg.eigh(C.T @ C)  # ascending; W: (k_A, k_A)
    V0 = W[:, ::-1][:, :n]  # (k_A, n) leading right singular directions
    Qy, _ = np.linalg.qr(C @ V0)  # (k_B, n) orthonormal basis of the leading left subspace
    us, s, vt = np.linalg.svd(Qy.T @ C, full_matrices=False)  # (n, n), (n,), (n, k_A)
    s_trailing = np.sqrt(np.clip(lam[::-1][n:], 0.0, None))  # (k_A - n,)
    tail = float(np.linalg.norm(C - (C @ vt.T) @ vt))
    return Qy @ us, s, vt, np.concatenate([s, s_trailing]), tail


@dataclass
class ProductSVD:
    """Leading singular triplets of a factored product ``B @ A``, without forming it.

    With ``B = Q_B R_B`` and ``A^T = Q_A R_A`` and the core SVD
    ``R_B R_A^T ~ u_core diag(s) vt_core``: ``U = Q_B u_core`` and
    ``V^T = vt_core Q_A^T``. When the orthonormal factors ``Q_B``/``Q_A`` were not
    formed (the cheaper path), singular vectors are recovered from the factors:
    ``U_i = B (R_A^T v_i) / s_i`` and ``V_i^T = (u_i^T R_B) A / s_i``, since
    ``B A V = U S`` and ``U^T B A = S V^T``.
    """

    B: np.ndarray  # (d_out, R)
    A: np.ndarray  # (R, d_in)
    r_left: np.ndarray  # R_B: (k_B, R)
    r_right: np.ndarray  # R_A: (k_A, R)
    u_core: np.ndarray  # (k_B, n) leading core left vectors (n = k for a full SVD)
    s: np.ndarray  # (n,) leading singular values, descending
    vt_core: np.ndarray  # (n, k_A)
    singular_values: np.ndarray  # (k,) all singular values, k = min(k_B, k_A)
    tail_norm: float  # ||B A - (rank-n approximation built from left()/right())||_F
    q_left: Optional[np.ndarray] = None  # Q_B: (d_out, k_B), orthonormal columns
    q_right: Optional[np.ndarray] = None  # Q_A: (d_in, k_A), orthonormal columns

    def _inverse_s(self, start: int, stop: int) -> np.ndarray:
        s = self.s[start:stop]
        out = np.zeros_like(s)
        np.divide(1.0, s, out=out, where=s > 0.0)
        return out

    def left(self, start: int, stop: int) -> np.ndarray:
        """Left singular vectors ``start:stop`` as a ``(d_out, stop - start)`` array."""
        if self.q_left is not None:
            return self.q_left @ self.u_core[:, start:stop]
        y = self.r_right.T @ self.vt_core[start:stop].T  # (R, n)
        return (self.B @ y) * self._inverse_s(start, stop)

    def right(self, start: int, stop: int) -> np.ndarray:
        """Right singular vectors ``start:stop`` as a ``(stop - start, d_in)`` array."""
        if self.q_right is not None:
            return self.vt_core[start:stop] @ self.q_right.T
        z = self.u_core[:, start:stop].T @ self.r_left  # (n, R)
        return (z @ self.A) * self._inverse_s(start, stop)[:, None]

    @property
    def noise_floor(self) -> float:
        """Singular values at or below this are numerical noise."""
        if self.s.size == 0:
            return 0.0
        size = max(self.B.shape[0], self.A.shape[1], self.B.shape[1])
        return float(self.s[0]) * np.finfo(np.float64).eps * size


def product_svd(
    B: np.ndarray, A: np.ndarray, rank: Optional[int] = None, *, explicit_q: bool = False
) -> ProductSVD:
    """SVD of ``B @ A`` without forming it (full thin SVD, or the leading ``rank`` triplets).

    ``B``: ``(d_out, R)``, ``A``: ``(R, d_in)``. Thin QR ``B = Q_B R_B`` and
    ``A^T = Q_A R_A``, then an SVD of the small core ``C = R_B @ R_A^T``
    (``min(d_out, R) x min(d_in, R)``): ``B A = Q_B C Q_A^T``.
    Cost ``O((d_out + d_in) R^2 + R^3)``; ``d_out x d_in`` is never formed,
    except when ``R >= min(d_out, d_in)``: then the factors are no smaller than
    the product and the core is ``B @ A`` itself (``Q_B = I``, ``Q_A = I``).

    With ``explicit_q=False`` only the triangular factors are computed (about
    half the QR cost) and singular vectors are recovered from ``B`` and ``A``
    on demand, accurate for the directions above the noise floor. With ``rank``
    smaller than the core, only the leading ``rank`` triplets are computed
    (see :func:`_leading_triplets`); otherwise the core gets a full SVD
    (``gesdd``). Use ``explicit_q=True`` and no ``rank`` when all directions,
    including small ones, are needed to full accuracy.
    """
    d_out, total = B.shape
    d_in = A.shape[1]
    if total >= min(d_out, d_in):
        # The stacked factors are no smaller than the product itself: QR would
        # not shrink anything, so the core is B @ A with Q_B = I, Q_A = I.
        R_B, R_A = B, A.T  # (d_out, R), (d_in, R)
        Q_B = np.eye(d_out) if explicit_q else None
        Q_A = np.eye(d_in) if explicit_q else None
    elif explicit_q:
        Q_B, R_B = np.linalg.qr(B)  # (d_out, k_B), (k_B, R)
        Q_A, R_A = np.linalg.qr(A.T)  # (d_in, k_A), (k_A, R)
    else:
        Q_B = Q_A = None
        R_B = np.linalg.qr(B, mode="r")  # (k_B, R)
        R_A = np.linalg.qr(A.T, mode="r")  # (k_A, R)
    core = R_B @ R_A.T  # (k_B, k_A)
    if rank is not None and 0 < rank < min(core.shape):
        u, s, vt, s_all, tail = _leading_triplets(core, rank)
    else:
        u, s, vt = np.linalg.svd(core, full_matrices=False)  # (k_B, k), (k,), (k, k_A)
        s_all, tail = s, 0.0
    return ProductSVD(
        B=B,
        A=A,
        r_left=R_B,
        r_right=R_A,
        u_core=u,
        s=s,
        vt_core=vt,
        singular_values=s_all,
        tail_norm=tail,
        q_left=Q_B,
        q_right=Q_A,
    )
