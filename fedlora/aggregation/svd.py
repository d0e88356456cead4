"""Product-aware, rank-optimal aggregation by factored SVD (with optional error feedback).

The exact weighted sum of the client products ``B_k A_k`` is re-factorised to rank ``r``
(optimal), and the truncation residual is optionally fed back into the next round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping as MappingABC
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from .backend import as_float64
from .base import Method, register
from .linalg import ProductSVD, product_norm, product_svd, stack_factors
from .states import State
from .types import AggregationError, LoraFactors
from .validation import PreparedUpdates, check_rank_option, resolve_scale, weighted_alpha

__all__ = ["SvdErrorFeedback", "SvdMethod", "SvdReport", "svd"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


@dataclass(frozen=True)
class SvdReport:
    """What the ``svd`` method did on one module.

    ``truncation_error`` is ``||target - result||_F``, the Frobenius norm of the
    discarded singular values, where ``target`` is the weighted sum of client
    products (plus the carried residual under error feedback).
    """

    rank: int  # rank of the returned factors
    # (k,) singular values of the target, descending. The leading ``rank`` are
    # accurate to working precision; without error feedback the trailing ones
    # are Gram-eigenvalue estimates (absolute accuracy ~ sqrt(eps) * s_max).
    singular_values: np.ndarray
    truncation_error: float
    relative_error: float  # truncation_error / ||target||_F (0 when the target is 0)
    residual_rank: int  # rank of the residual carried to the next round (0 without feedback)


class SvdErrorFeedback:
    """Per-module residual of the ``svd`` method, carried across rounds.

    The residual of a module is the part of the target that was discarded by
    the rank truncation, kept in factored form ``B_res @ A_res`` (``B_res``:
    ``(d_out, q)``, ``A_res``: ``(q, d_in)``, scale 1; singular values folded
    into ``B_res``). The next round adds it to the target as extra stacked
    columns, so the sum over rounds of the broadcast products plus the current
    residual equals the sum of the exact aggregates.

    ``max_residual_rank`` optionally caps ``q`` (keeping the largest discarded
    directions); the cap makes the feedback lossy but bounds memory, which
    otherwise can grow by ``sum_k r_k - r`` per round up to ``min(d_out, d_in)``.
    """

    def __init__(self, max_residual_rank: Optional[int] = None) -> None:
        if max_residual_rank is not None and (
            isinstance(max_residual_rank, bool) or int(max_residual_rank) < 0
        ):
            raise ValueError(f"max_residual_rank must be a non-negative integer, got {max_residual_rank!r}")
        self.max_residual_rank = None if max_residual_rank is None else int(max_residual_rank)
        self.residuals: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self.rounds = 0
        self.dropped_norm: Dict[str, float] = {}  # energy lost to the cap, per module (cumulative)

    def residual(self, name: str) -> Optional[LoraFactors]:
        """The residual of module ``name`` as factors (scale 1), or ``None``."""
        pair = self.residuals.get(name)
        if pair is None:
            return None
        B_res, A_res = pair
        return LoraFactors(A=A_res.copy(), B=B_res.copy(), scale=1.0)

    def residual_norm(self, name: str) -> float:
        """Frobenius norm of the residual of module ``name`` (0 if none)."""
        pair = self.residuals.get(name)
        return 0.0 if pair is None else product_norm(*pair)

    def reset(self) -> None:
        """Forget all residuals."""
        self.residuals.clear()
        self.dropped_norm.clear()
        self.rounds = 0

    def state_dict(self) -> Dict[str, Any]:
        """Checkpointable state: plain Python values and numpy ``float64`` arrays."""
        return {
            "version": _STATE_VERSION,
            "rounds": self.rounds,
            "max_residual_rank": self.max_residual_rank,
            "residuals": {name: {"A": A.copy(), "B": B.copy()} for name, (B, A) in self.residuals.items()},
            "dropped_norm": dict(self.dropped_norm),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`."""
        version = state.get("version", _STATE_VERSION)
        if version != _STATE_VERSION:
            raise ValueError(f"unsupported SvdErrorFeedback state version {version!r}")
        residuals: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        for name, pair in dict(state.get("residuals", {})).items():
            A = as_float64(pair["A"]).copy()
            B = as_float64(pair["B"]).copy()
            if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
                raise ValueError(
                    f"residual of module {name!r} has inconsistent shapes B {B.shape}, A {A.shape}"
                )
            residuals[name] = (B, A)
        cap = state.get("max_residual_rank", None)
        self.max_residual_rank = None if cap is None else int(cap)
        self.residuals = residuals
        self.rounds = int(state.get("rounds", 0))
        self.dropped_norm = {str(k): float(v) for k, v in dict(state.get("dropped_norm", {})).items()}


def _target_rank(rank: Union[None, int, Mapping[str, int]], name: str, default: int) -> int:
    if rank is None:
        return default
    if isinstance(rank, MappingABC):
        if name not in rank:
            raise ValueError(f"option rank has no entry for module {name!r}")
        return check_rank_option(rank[name], name)
    return check_rank_option(rank, name)


def _balanced_factors(
    psvd: ProductSVD, keep: int, rank: int, s_out: float, d_out: int, d_in: int
) -> Tuple[np.ndarray, np.ndarray]:
    """``B = U sqrt(S / s_out)`` and ``A = sqrt(S / s_out) V^T``, zero-padded to ``rank``."""
    root = np.sqrt(psvd.s[:keep] / s_out)  # (keep,)
    B = np.zeros((d_out, rank))  # (d_out, r)
    A = np.zeros((rank, d_in))  # (r, d_in)
    if keep:
        B[:, :keep] = psvd.left(0, keep) * root
        A[:keep] = root[:, None] * psvd.right(0, keep)
    return B, A


def svd(
    prepared: PreparedUpdates,
    p: np.ndarray,
    *,
    rank: Union[None, int, Mapping[str, int]] = None,
    scale: Optional[float] = None,
    alpha: Optional[float] = None,
    error_feedback: Optional[bool] = None,
    state: Optional[SvdErrorFeedback] = None,
    report: Optional[MutableMapping] = None,
) -> Dict[str, LoraFactors]:
    """Best rank-``r`` factorisation of the exact aggregate ``sum_k p_k s_k B_k A_k``.

    The stacked factors (``B_stack``: ``(d_out, R)``, ``A_stack``: ``(R, d_in)``,
    ``R = sum_k r_k``) are reduced by thin QR and an SVD of the small core
    ``R_B @ R_A^T``; the dense ``d_out x d_in`` matrix is never formed (unless
    ``R >= min(d_out, d_in)``, where the factors are no smaller than it). Keeping
    the top ``r`` singular triplets is optimal in Frobenius and spectral norm
    (Eckart-Young); the error is the norm of the discarded singular values.
    Without error feedback only the leading ``r`` triplets of the core are
    computed (Gram eigenvectors refined by one Rayleigh-Ritz step); with error
    feedback the core gets a full SVD so the discarded directions are exact.

    Options:
        rank: output rank ``r`` (int, or module -> int); default the max client rank.
            If the target has fewer than ``r`` non-trivial directions, the factors
            are zero-padded so every message has rank ``r``.
        scale / alpha: output scale ``s_out`` (``scale``, or ``alpha / r``);
            default ``alpha_bar / r`` with ``alpha_bar = sum_k p_k s_k r_k``.
            Factors are balanced: ``B = U sqrt(S / s_out)``,
            ``A = sqrt(S / s_out) V^T``, so ``s_out * B @ A = U S V^T``.
            Components are sorted by singular value, so
            :func:`~fedlora.aggregation.fit_rank` truncation stays optimal.
        error_feedback / state: with ``error_feedback=True`` and an
            :class:`SvdErrorFeedback` ``state``, the residual of the previous
            round is added to the target and the new residual is stored.
            ``error_feedback`` defaults to ``state is not None``.
        report: a mutable mapping filled with module -> :class:`SvdReport`.
    """
    if error_feedback is None:
        error_feedback = state is not None
    if error_feedback:
        if state is None:
            raise ValueError("error_feedback=True needs state=SvdErrorFeedback() to hold the residual")
        if not isinstance(state, SvdErrorFeedback):
            raise TypeError(f"state must be an SvdErrorFeedback, got {type(state).__name__}")
    if report is not None and not isinstance(report, MutableMapping):
        raise TypeError(f"report must be a mutable mapping, got {type(report).__name__}")

    out: Dict[str, LoraFactors] = {}
    new_residuals: Dict[str, Optional[Tuple[np.ndarray, np.ndarray]]] = {}
    dropped: Dict[str, float] = {}
    reports: Dict[str, SvdReport] = {}
    for name in prepared.modules:
        factors = prepared.module(name)
        d_out, d_in = factors[0].d_out, factors[0].d_in
        r_out = _target_rank(rank, name, max(f.rank for f in factors))
        active = [(pk * f.scale, f) for pk, f in zip(p, factors) if pk > 0.0]

        carried = state.residuals.get(name) if error_feedback else None
        if carried is not None and (carried[0].shape[0] != d_out or carried[1].shape[1] != d_in):
            raise AggregationError(
                f"module {name!r}: stored residual has shape ({carried[0].shape[0]}, {carried[1].shape[1]}) "
                f"but the updates have (d_out, d_in) = ({d_out}, {d_in})"
            )
        B_stack, A_stack = stack_factors(
            [f for _, f in active], [c for c, _ in active], extra=[carried]
        )  # (d_out, R), (R, d_in)
        if error_feedback:
            # Full SVD with explicit orthonormal bases: the small discarded
            # directions become the residual and must be accurate.
            psvd = product_svd(B_stack, A_stack, explicit_q=True)
        else:
            psvd = product_svd(B_stack, A_stack, rank=r_out)
        del B_stack, A_stack  # still referenced by psvd

        s_lead = psvd.s  # (n,) leading singular values (all of them on the full path)
        keep = min(r_out, int(np.count_nonzero(s_lead > psvd.noise_floor)))
        s_out = resolve_scale(r_out, weighted_alpha(factors, p), scale=scale, alpha=alpha)
        B, A = _balanced_factors(psvd, keep, r_out, s_out, d_out, d_in)
        out[name] = LoraFactors(A=A, B=B, scale=s_out)

        discarded = s_lead[keep:]
        truncation_error = math.sqrt(psvd.tail_norm**2 + float(np.sum(discarded**2)))
        total = math.sqrt(float(np.sum(s_lead[:keep] ** 2)) + truncation_error**2)
        residual_rank = 0
        if error_feedback:
            n_res = int(np.count_nonzero(discarded > psvd.noise_floor))
            if state.max_residual_rank is not None and n_res > state.max_residual_rank:
                lost = discarded[state.max_residual_rank : n_res]
                dropped[name] = float(math.sqrt(float(np.sum(lost**2))))
                n_res = state.max_residual_rank
            if n_res:
                B_res = psvd.left(keep, keep + n_res) * discarded[:n_res]  # (d_out, q)
                A_res = psvd.right(keep, keep + n_res)  # (q, d_in)
                new_residuals[name] = (B_res, A_res)
            else:
                new_residuals[name] = None
            residual_rank = n_res
        reports[name] = SvdReport(
            rank=r_out,
            singular_values=psvd.singular_values.copy(),
            truncation_error=truncation_error,
            relative_error=truncation_error / total if total > 0.0 else 0.0,
            residual_rank=residual_rank,
        )
        logger.debug(
            "svd %r: R=%d -> r=%d, truncation error %.3g (relative %.3g), residual rank %d",
            name,
            int(sum(f.rank for _, f in active)) + (0 if carried is None else carried[0].shape[1]),
            r_out,
            truncation_error,
            reports[name].relative_error,
            residual_rank,
        )

    # Commit state only once every module succeeded.
    if error_feedback:
        for name, pair in new_residuals.items():
            if pair is None:
                state.residuals.pop(name, None)
            else:
                state.residuals[name] = pair
        for name, lost in dropped.items():
            prev = state.dropped_norm.get(name, 0.0)
            state.dropped_norm[name] = math.sqrt(prev**2 + lost**2)
        state.rounds += 1
    if report is not None:
        report.update(reports)
    return out


@register
class SvdMethod(Method):
    """The exact weighted sum of client products B_k A_k, re-factorised to rank r (optimal),
    with the truncation residual optionally fed back into the next round."""

    name = "svd"
    combine = staticmethod(svd)
    linear = False  # the SVD of the mean of products B_k A_k

    def __post_init__(self) -> None:
        self.feedback = (SvdErrorFeedback()
                         if self.options.get("error_feedback") else None)

    def checkpoint_state(self) -> tuple[State, dict[str, Any]]:
        if self.feedback is None:
            return {}, {}
        sd = self.feedback.state_dict()
        arrays = {f"residual/{m}/{which}": pair[which]
                  for m, pair in sd.pop("residuals").items() for which in ("A", "B")}
        return arrays, sd

    def restore_state(self, arrays: Mapping[str, np.ndarray], values: Mapping[str, Any]) -> None:
        if self.feedback is None:
            super().restore_state(arrays, values)
            return
        residuals: dict[str, dict[str, np.ndarray]] = {}
        for key, a in arrays.items():
            module, which = key[len("residual/"):].rsplit("/", 1)
            residuals.setdefault(module, {})[which] = a
        self.feedback.load_state_dict({**values, "residuals": residuals})

    def _options(self, global_state: State) -> dict[str, Any]:
        opts: dict[str, Any] = {"scale": self.scale, "rank": self.rank}
        if self.feedback is not None:
            opts.update(error_feedback=True, state=self.feedback)
        return opts
