"""Privacy accounting: pure functions of a history of subsampled Gaussian steps.

Every mechanism of :mod:`fedlora.privacy` is the (Poisson-subsampled) Gaussian mechanism:
a query with L2 sensitivity ``S`` is released with noise ``N(0, (sigma * S)^2)``; ``sigma``
is the *noise multiplier* and ``q`` the probability that the privacy unit takes part in a
step. A run is a composition of such steps, kept as Opacus' history format: a list of
``(noise_multiplier, sample_rate, num_steps)`` tuples. Epsilon is a pure function of
(accountant, history, delta), computed by :func:`epsilon_of_history`:

* ``"rdp"``: Renyi-DP of the subsampled Gaussian (Mironov et al. 2019), summed over the
  history, converted to (epsilon, delta) with Balle et al. 2020 (Opacus' conversion),
  minimised over :data:`RDP_ORDERS` (Opacus' default orders plus 80..1024 so that
  small-epsilon runs are not cut off at order 63).
* ``"prv"``: numerical composition of privacy-loss random variables (Gopi et al. 2021,
  Opacus' PRVAccountant) with ``eps_error`` :data:`PRV_EPS_ERROR`; its *upper* bound is
  used. RDP is also a valid upper bound, so the smaller of the two is reported; RDP alone
  is used when PRV fails numerically (tiny sigma) or when the RDP bound already exceeds
  :data:`PRV_RDP_CUTOFF` (such budgets are meaningless and PRV becomes very slow there).

Planning: a client cannot know in which future rounds it will be sampled, so a per-client
budget is planned for the worst case, taking part in every round:
``steps = num_rounds * local_steps`` (:func:`planned_steps`). A client sampled less often
spends less and ends under budget; the guarantee holds for every sampling outcome.
No file, no Flower, no training loop here.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

__all__ = [
    "ACCOUNTANTS",
    "PRV_EPS_ERROR",
    "RDP_ORDERS",
    "History",
    "INTEGER_RDP_ORDERS",
    "calibrate_noise_multiplier",
    "canonical_history",
    "check_accountant",
    "check_count",
    "check_delta",
    "check_rate",
    "check_sigma",
    "compute_epsilon",
    "epsilon_dp_accounting",
    "epsilon_of_history",
    "history_extends",
    "planned_steps",
    "real_or_none",
]

logger = logging.getLogger(__name__)

#: Accountants supported: Renyi DP and privacy random variables (Opacus' names), and Renyi
#: DP at integer orders only (``rdp-int``: a ledger holding distributed Skellam steps, whose
#: RDP bound is proven for integer orders; :mod:`fedlora.privacy.skellam`).
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "rdp-int")
#: RDP orders: Opacus' defaults plus large orders for small-epsilon regimes.
RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS) + (80, 96, 128, 256, 512, 1024)
#: Integer orders (``rdp-int``): every one from 2 to 63, then the large ones.
INTEGER_RDP_ORDERS: tuple[float, ...] = tuple(range(2, 64)) + (80, 96, 128, 256, 512, 1024)
#: Error allowed in PRV's epsilon estimate; its upper bound (estimate + error) is used.
PRV_EPS_ERROR = 0.01
#: Above this RDP epsilon, PRV is not attempted (slow and meaningless).
PRV_RDP_CUTOFF = 100.0
#: Largest noise multiplier :func:`calibrate_noise_multiplier` will try.
MAX_SIGMA = 1e6

History = list[tuple[float, float, int]]

# ------------------------------------------------- validation (shared by the privacy package)


def real_or_none(value: Any) -> float | None:
    """``value`` as a float, or None for bools, non-numbers and non-finite numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def check_sigma(noise_multiplier: Any) -> float:
    sigma = real_or_none(noise_multiplier)
    if sigma is None or sigma <= 0:
        raise ValueError(f"noise_multiplier must be a finite float > 0, got {noise_multiplier!r}")
    return sigma


def check_rate(sample_rate: Any) -> float:
    q = real_or_none(sample_rate)
    if q is None or not 0 < q <= 1:
        raise ValueError(f"sample_rate must be a float in (0, 1], got {sample_rate!r}")
    return q


def check_count(num_steps: Any, *, minimum: int, name: str = "num_steps") -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) \
            or num_steps < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {num_steps!r}")
    return int(num_steps)


def check_delta(delta: Any) -> float:
    d = real_or_none(delta)
    if d is None or not 0 < d < 1:
        raise ValueError(f"delta must be a float in (0, 1), got {delta!r}")
    return d


def check_accountant(name: Any) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    return name


def _entry(entry: Any) -> tuple[float, float, int]:
    """One validated history entry ``(noise_multiplier, sample_rate, num_steps)``."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        raise ValueError(f"a history entry must be (noise_multiplier, sample_rate, num_steps), "
                         f"got {entry!r}")
    sigma, q, n = entry
    return check_sigma(sigma), check_rate(q), check_count(n, minimum=1)


def canonical_history(history: Iterable[Any]) -> History:
    """Validated history with consecutive entries of equal (sigma, q) merged (Opacus' format)."""
    out: History = []
    for raw in history:
        sigma, q, n = _entry(raw)
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + n)
        else:
            out.append((sigma, q, n))
    return out


def history_extends(old: Iterable[Any], new: Iterable[Any]) -> bool:
    """True if the steps of ``old`` are a prefix of the steps of ``new`` (nothing forgotten)."""
    old, new = canonical_history(old), canonical_history(new)
    if not old:
        return True
    if len(new) < len(old) or list(new[: len(old) - 1]) != list(old[:-1]):
        return False
    last_old, last_new = old[-1], new[len(old) - 1]
    return last_new[:2] == last_old[:2] and last_new[2] >= last_old[2]


# --------------------------------------------------------------------------- epsilon


@functools.lru_cache(maxsize=512)
def _rdp_per_step(sample_rate: float, noise_multiplier: float,
                  orders: tuple[float, ...] = RDP_ORDERS) -> np.ndarray:
    """RDP of one subsampled Gaussian step at every order of ``orders`` (Opacus)."""
    out = np.asarray(
        rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                 orders=list(orders)),
        dtype=np.float64,
    )
    out.flags.writeable = False
    return out


def _epsilon_rdp(history: History, delta: float,
                 orders: tuple[float, ...] = RDP_ORDERS) -> float:
    """Epsilon by RDP: ``min_a [sum_i n_i * RDP_a(q_i, sigma_i)] -> (eps, delta)`` (Balle et al.).

    Equal to ``RDPAccountant(history).get_epsilon(delta, alphas=orders)``, with the
    per-step RDP vectors cached.
    """
    if not history:
        return 0.0
    rdp = sum(_rdp_per_step(q, sigma, orders) * n for sigma, q, n in history)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    for w in caught:
        logger.debug("RDP conversion: %s", w.message)
    return max(float(eps), 0.0)


def _epsilon_prv(history: History, delta: float) -> float:
    """Epsilon by PRV (upper bound), capped by RDP; RDP where PRV is unusable."""
    if not history:
        return 0.0
    eps_rdp = _epsilon_rdp(history, delta)
    if eps_rdp > PRV_RDP_CUTOFF:
        return eps_rdp
    accountant = PRVAccountant()
    accountant.history = list(history)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                eps_prv = float(accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
    except (ValueError, ArithmeticError, RuntimeError) as exc:
        logger.warning("PRV accounting failed (%s); using the RDP bound %.6g", exc, eps_rdp)
        return eps_rdp
    if not math.isfinite(eps_prv):
        logger.warning("PRV accounting gave %r; using the RDP bound %.6g", eps_prv, eps_rdp)
        return eps_rdp
    return min(max(eps_prv, 0.0), eps_rdp)


def epsilon_of_history(history: Iterable[Any], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of a history of subsampled Gaussian steps.

    ``history`` is a list of ``(noise_multiplier, sample_rate, num_steps)``; the result is
    a valid upper bound on epsilon for the composition of all those steps.
    """
    accountant = check_accountant(accountant)
    delta = check_delta(delta)
    hist = canonical_history(history)
    if accountant == "prv":
        return _epsilon_prv(hist, delta)
    return _epsilon_rdp(hist, delta, INTEGER_RDP_ORDERS if accountant == "rdp-int" else RDP_ORDERS)


def compute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "rdp") -> float:
    """Epsilon of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism."""
    steps = check_count(steps, minimum=0, name="steps")
    if steps == 0:
        return 0.0
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta=delta,
                              accountant=accountant)


def planned_steps(*, num_rounds: int, local_steps: int) -> int:
    """Steps a client plans for: ``num_rounds * local_steps``.

    Worst case: the client takes part in every round. It cannot know its future sampling,
    and the budget must hold whatever the sampling turns out to be; rounds it sits out
    only leave budget unspent. For ``update`` mode pass ``local_steps=1`` (one release per round).
    """
    return check_count(num_rounds, minimum=1, name="num_rounds") * \
        check_count(local_steps, minimum=1, name="local_steps")


def calibrate_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                               steps: int, accountant: str = "rdp",
                               epsilon_tolerance: float = 0.01,
                               more_phases: Iterable[tuple[float, int]] = (),
                               fixed_history: Iterable[Any] = ()) -> float:
    """Smallest-found sigma with ``epsilon(steps x SGM(q, sigma), delta) <= target_epsilon``.

    Binary search on sigma between a bracket ``eps(lo) > target >= eps(hi)``; returns ``hi``
    once ``target - eps(hi) <= min(epsilon_tolerance, 0.01 * target)`` (or the bracket cannot
    shrink further), so the planned run ends at or just under the target under the same
    accountant (:func:`epsilon_of_history`, the same numbers as :class:`PrivacyBudget`).
    ``steps`` is the whole run (see :func:`planned_steps`); ``more_phases`` are further
    ``(sample_rate, steps)`` phases of the same run at the same sigma (e.g. the full-batch
    steps of linear-probe rounds), composed with it; ``fixed_history`` holds releases of the
    same run at their own sigma (a site's noised example count), composed as they are. PRV is bracketed around the RDP
    answer so that it is never evaluated at tiny sigma.
    """
    accountant = check_accountant(accountant)
    target = real_or_none(target_epsilon)
    if target is None or target <= 0:
        raise ValueError(f"target_epsilon must be a finite float > 0, got {target_epsilon!r}")
    delta = check_delta(target_delta)
    q = check_rate(sample_rate)
    steps = check_count(steps, minimum=1, name="steps")
    tol = real_or_none(epsilon_tolerance)
    if tol is None or tol <= 0:
        raise ValueError(f"epsilon_tolerance must be a finite float > 0, got {epsilon_tolerance!r}")

    phases = [(q, steps)] + [(check_rate(r), check_count(n, minimum=1, name="steps"))
                             for r, n in more_phases]
    fixed = canonical_history(fixed_history)

    def eps(sigma: float) -> float:
        return epsilon_of_history([*fixed, *((sigma, r, n) for r, n in phases)], delta=delta,
                                  accountant=accountant)

    if accountant == "prv":
        start = calibrate_noise_multiplier(target_epsilon=target, target_delta=delta,
                                           sample_rate=q, steps=steps, accountant="rdp",
                                           epsilon_tolerance=tol, more_phases=phases[1:],
                                           fixed_history=fixed)
        grow, shrink = 1.25, 0.8
    else:
        start, grow, shrink = 1.0, 2.0, 0.5

    hi, eps_hi = start, eps(start)
    while eps_hi > target:                       # raise sigma until the target is met
        hi *= grow
        if hi > MAX_SIGMA:
            raise ValueError(f"privacy budget too small: epsilon {target} at delta {delta} "
                             f"needs a noise multiplier above {MAX_SIGMA:g}")
        eps_hi = eps(hi)
    lo = hi * shrink                             # lower sigma until the target is missed
    eps_lo = eps(lo)
    while eps_lo <= target:
        if lo < 1e-6:                            # a budget so large that noise hardly matters
            logger.warning("epsilon %g is met with sigma < 1e-6; returning %.3g", target, lo)
            return float(lo)
        hi, eps_hi = lo, eps_lo
        lo *= shrink
        eps_lo = eps(lo)
    for _ in range(200):                         # bisect: eps(lo) > target >= eps(hi)
        if target - eps_hi <= min(tol, 0.01 * target) or hi - lo <= 1e-12 * hi:
            break
        mid = 0.5 * (lo + hi)
        eps_mid = eps(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    logger.debug("calibrated sigma %.6g: epsilon %.6g (target %g, delta %g, q %g, %d steps, %s)",
                 hi, eps_hi, target, delta, q, steps, accountant)
    return float(hi)


def epsilon_dp_accounting(*, noise_multiplier: float, sample_rate: float, steps: int,
                          delta: float, orders: Sequence[float] | None = None) -> float:
    """Epsilon of ``steps`` x PoissonSampled(q, Gaussian(sigma)) by Google's dp_accounting (RDP).

    An independent implementation, for cross-checking Opacus. ``orders``: RDP orders
    (default: dp_accounting's own).
    """
    import dp_accounting  # deferred: only the cross-check of Opacus needs it
    from dp_accounting.rdp import RdpAccountant

    sigma, q, delta = check_sigma(noise_multiplier), check_rate(sample_rate), check_delta(delta)
    steps = check_count(steps, minimum=0, name="steps")
    accountant = RdpAccountant(list(orders) if orders is not None else None)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))
