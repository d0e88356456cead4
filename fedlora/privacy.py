"""Differential-privacy accounting: pure, auditable, no Flower and no training loop.

What is accounted
-----------------
Every mechanism here is the (Poisson-subsampled) Gaussian mechanism: a query with
L2 sensitivity ``C`` is released with noise ``N(0, (sigma * C)^2)``; ``sigma`` is the
*noise multiplier* and ``q`` the probability that a record takes part in a step.
A run is a composition of such steps, kept as Opacus' history format: a list of
``(noise_multiplier, sample_rate, num_steps)`` tuples. Epsilon is a pure function of
(mechanism, history, delta), computed by :func:`epsilon_of_history`:

* ``"rdp"``: Renyi-DP of the subsampled Gaussian (Mironov et al. 2019), summed over the
  history, converted to (epsilon, delta) with Balle et al. 2020 (Opacus' conversion),
  minimised over :data:`RDP_ORDERS` (Opacus' default orders plus 80..1024 so that
  small-epsilon runs are not cut off at order 63).
* ``"prv"``: numerical composition of privacy-loss random variables (Gopi et al. 2021,
  Opacus' PRVAccountant) with ``eps_error`` :data:`PRV_EPS_ERROR`; its *upper* bound is
  used. RDP is also a valid upper bound, so the smaller of the two is reported; RDP alone
  is used when PRV fails numerically (tiny sigma) or when the RDP bound already exceeds
  :data:`PRV_RDP_CUTOFF` (such budgets are meaningless and PRV becomes very slow there).

DP modes (run-config ``dp-mode``)
---------------------------------
* ``sample``: DP-SGD on each client (Opacus). One step = one Poisson-sampled batch,
  ``q = batch_size / num_examples``; a round adds ``local_steps`` steps. The privacy unit is
  one training example of that client.
* ``update``: local DP on the client's released LoRA update: clip the update to L2 norm
  ``C`` (:func:`clip_update`), add ``N(0, (sigma * C)^2)`` per entry
  (:func:`gaussian_noise_like`, :func:`update_noise_std`). Each round the client takes part
  in is ONE Gaussian step with ``q = 1.0``: the client's update is released whenever it is
  sampled, and the server knows who was sampled, so client sampling gives no amplification
  against the server. A run of ``R`` rounds is ``planned_steps(num_rounds=R, local_steps=1)``.
  Sensitivity ``C`` holds for add/remove of the client's whole contribution (its clipped
  update versus no update); for replace-one (two arbitrary datasets of the same client)
  it is ``2C`` (see :func:`update_noise_std`).
* ``client``: central client-level DP at the server (clipped updates, noise on the sum);
  accounted by the server with ``q`` = the fraction of clients sampled per round, one step
  a round (see :mod:`fedlora.central_dp`).
* ``off``: nothing.

Planning: a client cannot know in which future rounds it will be sampled, so a per-client
budget is planned for the worst case, taking part in every round:
``steps = num_rounds * local_steps`` (:func:`planned_steps`). A client sampled less often
spends less and ends under budget; the guarantee holds for every sampling outcome.

Persistence never forgets spent budget: :func:`save_state` writes atomically and keeps
the previous ledger as ``<path>.bak``; :func:`load_state` falls back to it and raises
:class:`PrivacyStateError` rather than ever returning a fresh (zero-spend) accountant.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedlora.config import ConfigError

__all__ = [
    "ACCOUNTANTS",
    "DP_MODES",
    "PRV_EPS_ERROR",
    "RDP_ORDERS",
    "STATE_VERSION",
    "ClientAccountant",
    "PrivacyConfigError",
    "PrivacyStateError",
    "calibrate_noise_multiplier",
    "check_privacy_params",
    "clip_update",
    "compute_epsilon",
    "epsilon_dp_accounting",
    "epsilon_of_history",
    "from_record_dict",
    "gaussian_noise_like",
    "load_state",
    "parse_dp_mode",
    "planned_steps",
    "privatize_update",
    "save_state",
    "to_record_dict",
    "update_noise_std",
]

logger = logging.getLogger(__name__)

#: Accounting mechanisms supported (Opacus' names).
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
#: DP mechanisms that can be combined with '+' in ``dp-mode``.
DP_MODES: tuple[str, ...] = ("sample", "update", "client")
#: Version of :meth:`ClientAccountant.state_dict`; bump when the accounting changes.
STATE_VERSION = 1
#: RDP orders: Opacus' defaults plus large orders for small-epsilon regimes.
RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS) + (80, 96, 128, 256, 512, 1024)
#: Error allowed in PRV's epsilon estimate; its upper bound (estimate + error) is used.
PRV_EPS_ERROR = 0.01
#: Above this RDP epsilon, PRV is not attempted (slow and meaningless).
PRV_RDP_CUTOFF = 100.0
#: Relative slack of :meth:`ClientAccountant.would_exceed` (floating-point noise only).
EXCEED_RTOL = 1e-9
#: Largest noise multiplier :func:`calibrate_noise_multiplier` will try.
MAX_SIGMA = 1e6

History = list[tuple[float, float, int]]

_LEDGER_FORMAT = "fedlora-privacy-ledger"


class PrivacyConfigError(ConfigError):
    """A privacy run-config value is not acceptable (a ValueError naming key, value, expected)."""


class PrivacyStateError(RuntimeError):
    """A privacy ledger cannot be read or would lose spent budget."""


# --------------------------------------------------------------------------- validation


def _real(value: Any) -> float | None:
    """``value`` as a float, or None for bools, non-numbers and non-finite numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _check_sigma(noise_multiplier: Any) -> float:
    sigma = _real(noise_multiplier)
    if sigma is None or sigma <= 0:
        raise ValueError(f"noise_multiplier must be a finite float > 0, got {noise_multiplier!r}")
    return sigma


def _check_rate(sample_rate: Any) -> float:
    q = _real(sample_rate)
    if q is None or not 0 < q <= 1:
        raise ValueError(f"sample_rate must be a float in (0, 1], got {sample_rate!r}")
    return q


def _check_count(num_steps: Any, *, minimum: int, name: str = "num_steps") -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) \
            or num_steps < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {num_steps!r}")
    return int(num_steps)


def _check_delta(delta: Any) -> float:
    d = _real(delta)
    if d is None or not 0 < d < 1:
        raise ValueError(f"delta must be a float in (0, 1), got {delta!r}")
    return d


def _check_mechanism(mechanism: Any) -> str:
    if mechanism not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {mechanism!r}")
    return mechanism


def _entry(entry: Any) -> tuple[float, float, int]:
    """One validated history entry ``(noise_multiplier, sample_rate, num_steps)``."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        raise ValueError(f"a history entry must be (noise_multiplier, sample_rate, num_steps), "
                         f"got {entry!r}")
    sigma, q, n = entry
    return _check_sigma(sigma), _check_rate(q), _check_count(n, minimum=1)


def _canonical(history: Iterable[Any]) -> History:
    """Validated history with consecutive entries of equal (sigma, q) merged (Opacus' format)."""
    out: History = []
    for raw in history:
        sigma, q, n = _entry(raw)
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + n)
        else:
            out.append((sigma, q, n))
    return out


def _extends(old: Iterable[Any], new: Iterable[Any]) -> bool:
    """True if the steps of ``old`` are a prefix of the steps of ``new`` (nothing forgotten)."""
    old, new = _canonical(old), _canonical(new)
    if not old:
        return True
    if len(new) < len(old) or list(new[: len(old) - 1]) != list(old[:-1]):
        return False
    last_old, last_new = old[-1], new[len(old) - 1]
    return last_new[:2] == last_old[:2] and last_new[2] >= last_old[2]


# --------------------------------------------------------------------------- epsilon


@functools.lru_cache(maxsize=512)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one subsampled Gaussian step at every order of :data:`RDP_ORDERS` (Opacus)."""
    out = np.asarray(
        rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                 orders=list(RDP_ORDERS)),
        dtype=np.float64,
    )
    out.flags.writeable = False
    return out


def _epsilon_rdp(history: History, delta: float) -> float:
    """Epsilon by RDP: ``min_a [sum_i n_i * RDP_a(q_i, sigma_i)] -> (eps, delta)`` (Balle et al.).

    Equal to ``RDPAccountant(history).get_epsilon(delta, alphas=RDP_ORDERS)``, with the
    per-step RDP vectors cached.
    """
    if not history:
        return 0.0
    rdp = sum(_rdp_per_step(q, sigma) * n for sigma, q, n in history)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
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
    mechanism = _check_mechanism(accountant)
    delta = _check_delta(delta)
    hist = _canonical(history)
    return _epsilon_rdp(hist, delta) if mechanism == "rdp" else _epsilon_prv(hist, delta)


def compute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "rdp") -> float:
    """Epsilon of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism."""
    steps = _check_count(steps, minimum=0, name="steps")
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
    return _check_count(num_rounds, minimum=1, name="num_rounds") * \
        _check_count(local_steps, minimum=1, name="local_steps")


def calibrate_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                               steps: int, accountant: str = "rdp",
                               epsilon_tolerance: float = 0.01) -> float:
    """Smallest-found sigma with ``epsilon(steps x SGM(q, sigma), delta) <= target_epsilon``.

    Binary search on sigma between a bracket ``eps(lo) > target >= eps(hi)``; returns ``hi``
    once ``target - eps(hi) <= min(epsilon_tolerance, 0.01 * target)`` (or the bracket cannot
    shrink further), so the planned run ends at or just under the target under the same
    accountant (:func:`epsilon_of_history`, the same numbers as :class:`ClientAccountant`).
    ``steps`` is the whole run (see :func:`planned_steps`). PRV is bracketed around the RDP
    answer so that it is never evaluated at tiny sigma.
    """
    mechanism = _check_mechanism(accountant)
    target = _real(target_epsilon)
    if target is None or target <= 0:
        raise ValueError(f"target_epsilon must be a finite float > 0, got {target_epsilon!r}")
    delta = _check_delta(target_delta)
    q = _check_rate(sample_rate)
    steps = _check_count(steps, minimum=1, name="steps")
    tol = _real(epsilon_tolerance)
    if tol is None or tol <= 0:
        raise ValueError(f"epsilon_tolerance must be a finite float > 0, got {epsilon_tolerance!r}")

    def eps(sigma: float) -> float:
        return epsilon_of_history([(sigma, q, steps)], delta=delta, accountant=mechanism)

    if mechanism == "prv":
        start = calibrate_noise_multiplier(target_epsilon=target, target_delta=delta,
                                           sample_rate=q, steps=steps, accountant="rdp",
                                           epsilon_tolerance=tol)
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
                 hi, eps_hi, target, delta, q, steps, mechanism)
    return float(hi)


def epsilon_dp_accounting(*, noise_multiplier: float, sample_rate: float, steps: int,
                          delta: float, orders: Sequence[float] | None = None) -> float:
    """Epsilon of ``steps`` x PoissonSampled(q, Gaussian(sigma)) by Google's dp_accounting (RDP).

    An independent implementation, for cross-checking Opacus. ``orders``: RDP orders
    (default: dp_accounting's own).
    """
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    sigma, q, delta = _check_sigma(noise_multiplier), _check_rate(sample_rate), _check_delta(delta)
    steps = _check_count(steps, minimum=0, name="steps")
    accountant = RdpAccountant(list(orders) if orders is not None else None)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


# --------------------------------------------------------------------------- accountant


class ClientAccountant:
    """One client's privacy ledger across rounds, over an Opacus accountant.

    Holds the Opacus history ``[(noise_multiplier, sample_rate, num_steps), ...]``
    (consecutive equal (sigma, q) merged) and reports :func:`epsilon_of_history` of it.
    Steps can only be added, so epsilon never decreases.
    """

    def __init__(self, mechanism: str = "rdp", *, target_epsilon: float | None = None,
                 target_delta: float | None = None) -> None:
        self._accountant = RDPAccountant() if _check_mechanism(mechanism) == "rdp" \
            else PRVAccountant()
        self.target_epsilon = _optional_target(target_epsilon, "target_epsilon")
        self.target_delta = None if target_delta is None else _check_delta(target_delta)

    @property
    def mechanism(self) -> str:
        """``"rdp"`` or ``"prv"``."""
        return self._accountant.mechanism()

    @property
    def history(self) -> History:
        """A copy of the history, ``[(noise_multiplier, sample_rate, num_steps), ...]``."""
        return list(self._accountant.history)

    @property
    def total_steps(self) -> int:
        """Number of mechanism steps recorded."""
        return sum(n for _, _, n in self._accountant.history)

    def __len__(self) -> int:
        return self.total_steps

    def __repr__(self) -> str:
        return (f"ClientAccountant({self.mechanism!r}, steps={self.total_steps}, "
                f"history={self._accountant.history!r})")

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
        """Record ``num_steps`` steps of the subsampled Gaussian at (sigma, q)."""
        entry = (_check_sigma(noise_multiplier), _check_rate(sample_rate),
                 _check_count(num_steps, minimum=0))
        if entry[2] == 0:
            return
        self._accountant.history = _canonical([*self._accountant.history, entry])

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the target delta)."""
        return epsilon_of_history(self._accountant.history, delta=self._delta(delta),
                                  accountant=self.mechanism)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, num_steps: int,
                      delta: float | None = None) -> float:
        """Epsilon if ``num_steps`` more steps at (sigma, q) were recorded (nothing is recorded)."""
        extra = (_check_sigma(noise_multiplier), _check_rate(sample_rate),
                 _check_count(num_steps, minimum=0))
        history = list(self._accountant.history) + ([extra] if extra[2] else [])
        return epsilon_of_history(history, delta=self._delta(delta), accountant=self.mechanism)

    def would_exceed(self, *, noise_multiplier: float, sample_rate: float, num_steps: int,
                     target_epsilon: float | None = None, delta: float | None = None) -> bool:
        """True if epsilon after those steps would be above ``target_epsilon`` (+ float slack).

        ``target_epsilon`` and ``delta`` default to the accountant's targets.
        """
        target = self.target_epsilon if target_epsilon is None else \
            _optional_target(target_epsilon, "target_epsilon")
        if target is None:
            raise ValueError("would_exceed needs target_epsilon (none given or stored)")
        after = self.epsilon_after(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                   num_steps=num_steps, delta=delta)
        return after > target * (1 + EXCEED_RTOL) + EXCEED_RTOL

    def _delta(self, delta: float | None) -> float:
        if delta is None:
            if self.target_delta is None:
                raise ValueError("delta is required (no target_delta stored)")
            return self.target_delta
        return _check_delta(delta)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: version, mechanism, history (lists), targets (or None)."""
        return {
            "version": STATE_VERSION,
            "mechanism": self.mechanism,
            "history": [[float(s), float(q), int(n)] for s, q, n in self._accountant.history],
            "target_epsilon": self.target_epsilon,
            "target_delta": self.target_delta,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` output; a used ledger only accepts a state that extends it.

        Raises :class:`PrivacyStateError` for a malformed state, an unknown version or one
        that would forget recorded steps.
        """
        other = ClientAccountant.from_state_dict(state)
        if not _extends(self._accountant.history, other._accountant.history):
            raise PrivacyStateError(
                "state would forget recorded privacy steps: "
                f"{self._accountant.history!r} -> {other._accountant.history!r}")
        self._accountant = other._accountant
        self.target_epsilon, self.target_delta = other.target_epsilon, other.target_delta

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ClientAccountant:
        """A new accountant from :meth:`state_dict` output (validated)."""
        try:
            if not isinstance(state, Mapping):
                raise ValueError(f"state must be a mapping, got {type(state).__name__}")
            version = state.get("version")
            if isinstance(version, bool) or version != STATE_VERSION:
                raise ValueError(f"unsupported state version {version!r} "
                                 f"(this code reads {STATE_VERSION})")
            history = state.get("history")
            if not isinstance(history, (list, tuple)):
                raise ValueError(f"history must be a list, got {history!r}")
            out = cls(state.get("mechanism"), target_epsilon=state.get("target_epsilon"),
                      target_delta=state.get("target_delta"))
            out._accountant.history = _canonical(history)
        except (ValueError, TypeError) as exc:
            raise PrivacyStateError(f"invalid privacy state: {exc}") from exc
        return out


def _optional_target(value: Any, name: str) -> float | None:
    if value is None:
        return None
    out = _real(value)
    if out is None or out <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return out


# --------------------------------------------------------------------------- persistence


def to_record_dict(accountant: ClientAccountant) -> dict[str, str | float | int]:
    """Flat ``str -> str/float/int`` form (for a Flower ConfigRecord); history as JSON text.

    Targets that are not set are left out.
    """
    state = accountant.state_dict()
    out: dict[str, str | float | int] = {
        "version": state["version"],
        "mechanism": state["mechanism"],
        "history": json.dumps(state["history"]),
        "total_steps": accountant.total_steps,
    }
    for key in ("target_epsilon", "target_delta"):
        if state[key] is not None:
            out[key] = float(state[key])
    return out


def from_record_dict(record: Mapping[str, Any]) -> ClientAccountant:
    """Inverse of :func:`to_record_dict`; raises :class:`PrivacyStateError` if malformed."""
    try:
        history = json.loads(record["history"])
        state = {
            "version": record["version"],
            "mechanism": record["mechanism"],
            "history": history,
            "target_epsilon": record.get("target_epsilon"),
            "target_delta": record.get("target_delta"),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise PrivacyStateError(f"invalid privacy record: {exc!r}") from exc
    out = ClientAccountant.from_state_dict(state)
    steps = record.get("total_steps")
    if steps is not None and steps != out.total_steps:
        raise PrivacyStateError(f"privacy record says {steps!r} steps, its history has "
                                f"{out.total_steps}")
    return out


def _bak(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def _state_digest(state: Mapping[str, Any]) -> str:
    text = json.dumps(state, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _encode(accountant: ClientAccountant) -> bytes:
    state = accountant.state_dict()
    doc = {"format": _LEDGER_FORMAT, "sha256": _state_digest(state), "state": state}
    return (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("utf-8")


def _decode(data: bytes) -> ClientAccountant:
    """Parse a ledger file's bytes; raises PrivacyStateError if anything is off."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PrivacyStateError(f"not a readable ledger ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != _LEDGER_FORMAT:
        raise PrivacyStateError("not a privacy ledger (wrong or missing format tag)")
    state = doc.get("state")
    try:
        digest = _state_digest(state)
    except (TypeError, ValueError) as exc:
        raise PrivacyStateError(f"ledger state not serialisable ({exc})") from exc
    if digest != doc.get("sha256"):
        raise PrivacyStateError("ledger checksum mismatch (corrupted)")
    return ClientAccountant.from_state_dict(state)


def _read(path: Path) -> ClientAccountant:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PrivacyStateError(f"cannot read {path}: {exc}") from exc
    try:
        return _decode(data)
    except PrivacyStateError as exc:
        raise PrivacyStateError(f"{path}: {exc}") from exc


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file next to ``path``, fsync, then ``os.replace`` it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def load_state(path: str | os.PathLike[str]) -> ClientAccountant | None:
    """The ledger at ``path``, else its ``.bak``; None only if neither file exists.

    A corrupt or truncated ledger falls back to ``<path>.bak`` (with a warning: the backup
    can lack the steps of the last save). If neither is usable, raises
    :class:`PrivacyStateError`: a lost ledger must never reset the spent budget to zero.
    """
    path = Path(path)
    bak = _bak(path)
    if not path.exists() and not bak.exists():
        return None
    errors = []
    if path.exists():
        try:
            return _read(path)
        except PrivacyStateError as exc:
            errors.append(str(exc))
            logger.warning("privacy ledger unusable: %s; trying %s", exc, bak)
    else:
        errors.append(f"{path}: missing")
        logger.warning("privacy ledger %s missing; trying %s", path, bak)
    if bak.exists():
        try:
            out = _read(bak)
        except PrivacyStateError as exc:
            errors.append(str(exc))
        else:
            logger.warning("privacy ledger restored from %s (%d steps); the last save may be "
                           "missing from it", bak, out.total_steps)
            return out
    else:
        errors.append(f"{bak}: missing")
    raise PrivacyStateError("no usable privacy ledger, refusing to start from zero spent budget: "
                            + "; ".join(errors))


def save_state(path: str | os.PathLike[str], accountant: ClientAccountant, *,
               allow_rewind: bool = False) -> None:
    """Write the ledger atomically; the previous ledger is kept as ``<path>.bak``.

    Temp file in the same folder, fsync, ``os.replace``. A previous ledger is copied to
    ``.bak`` (atomically too) only if it is valid, so a good backup is never replaced by a
    corrupt file. Unless ``allow_rewind``, refuses (:class:`PrivacyStateError`) to write a
    history that does not extend the stored one, or to overwrite unreadable ledgers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not allow_rewind:
        stored = load_state(path)
        if stored is not None and not _extends(stored.history, accountant.history):
            raise PrivacyStateError(
                f"refusing to save a ledger to {path} that forgets spent steps: stored "
                f"{stored.history!r}, new {accountant.history!r}")
    data = _encode(accountant)
    previous: bytes | None = None
    if path.exists():
        try:
            previous = path.read_bytes()
            _decode(previous)
        except (OSError, PrivacyStateError) as exc:
            logger.warning("not backing up unusable ledger %s (%s); keeping %s", path, exc,
                           _bak(path))
            previous = None
    if previous is not None:
        _write_atomic(_bak(path), previous)
    _write_atomic(path, data)


# --------------------------------------------------------------------------- config checks


def parse_dp_mode(text: str) -> frozenset[str]:
    """The DP mechanisms named by ``dp-mode``: ``"off"`` -> ``frozenset()``, else a
    '+'-combination of :data:`DP_MODES` (e.g. ``"sample+update"``), without repeats."""
    expected = ("'off' or a '+'-combination of " + ", ".join(DP_MODES)
                + " without repeats (e.g. 'sample+update')")
    if not isinstance(text, str):
        raise PrivacyConfigError("dp-mode", text, expected)
    parts = [p.strip().lower() for p in text.split("+")]
    if parts == ["off"]:
        return frozenset()
    if not all(p in DP_MODES for p in parts) or len(set(parts)) != len(parts):
        raise PrivacyConfigError("dp-mode", text, expected)
    return frozenset(parts)


def check_privacy_params(*, target_epsilon: float, target_delta: float, max_grad_norm: float,
                         num_examples: int | None = None, mode: str) -> frozenset[str]:
    """Validate the privacy run-config values; return the parsed ``dp-mode``.

    Raises :class:`PrivacyConfigError` naming the key, the value and what is accepted:
    epsilon must be finite and > 0, delta in (0, 1) and below ``1/num_examples`` when
    ``num_examples`` is given (a larger delta allows releasing a record outright),
    max-grad-norm finite and > 0. Values are checked even with ``dp-mode = off``.
    """
    modes = parse_dp_mode(mode)
    eps = _real(target_epsilon)
    if eps is None or eps <= 0:
        raise PrivacyConfigError("target-epsilon", target_epsilon, "a finite float > 0")
    delta = _real(target_delta)
    if delta is None or not 0 < delta < 1:
        raise PrivacyConfigError("target-delta", target_delta, "a float in (0, 1)")
    if num_examples is not None:
        n = _check_count(num_examples, minimum=1, name="num_examples")
        if delta >= 1 / n:
            raise PrivacyConfigError(
                "target-delta", target_delta,
                f"a float below 1/n = {1 / n:.6g} for n = {n} examples (typically <= 1/(10 n))")
    norm = _real(max_grad_norm)
    if norm is None or norm <= 0:
        raise PrivacyConfigError("max-grad-norm", max_grad_norm, "a finite float > 0")
    return modes


# --------------------------------------------------------------------------- update mode


def _global_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """``sqrt(sum_k ||a_k||^2)`` over all arrays, in float64."""
    total = 0.0
    for a in arrays.values():
        a64 = np.asarray(a, dtype=np.float64)
        total += float(np.dot(a64.ravel(), a64.ravel()))
    return math.sqrt(total)


def clip_update(delta: Mapping[str, np.ndarray], max_norm: float
                ) -> tuple[dict[str, np.ndarray], float]:
    """Scale the update by ``min(1, C / ||delta||_2)`` (global L2 norm over all arrays).

    Returns ``(clipped, original_norm)``; arrays keep their dtype and the clipped norm is
    ``<= max_norm`` after rounding too. Non-finite values raise ValueError.
    """
    c = _real(max_norm)
    if c is None or c <= 0:
        raise ValueError(f"max_norm must be a finite float > 0, got {max_norm!r}")
    arrays = {k: np.asarray(v) for k, v in delta.items()}
    for k, a in arrays.items():
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"update array {k!r} has dtype {a.dtype}, expected a float dtype")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"update array {k!r} has non-finite values")
    norm = _global_norm(arrays)
    if norm <= c:
        return {k: a.copy() for k, a in arrays.items()}, norm
    factor = c / norm
    for _ in range(8):
        clipped = {k: (a.astype(np.float64) * factor).astype(a.dtype) for k, a in arrays.items()}
        if _global_norm(clipped) <= c:
            return clipped, norm
        factor *= 1 - 1e-6  # rounding to the array dtype overshot: shrink a hair
    raise ArithmeticError("could not clip the update under max_norm")  # pragma: no cover


def update_noise_std(*, noise_multiplier: float, max_norm: float,
                     neighbouring: str = "add-remove") -> float:
    """Std of the Gaussian noise on a clipped update: ``sigma * sensitivity``.

    ``neighbouring="add-remove"`` (the client's whole contribution present or not):
    sensitivity ``C = max_norm``, std ``sigma * C``. ``"replace-one"`` (any two datasets of the
    same client): sensitivity ``2C``, std ``2 sigma C``, for the same accounting with ``sigma``.
    """
    sigma = _check_sigma(noise_multiplier)
    c = _real(max_norm)
    if c is None or c <= 0:
        raise ValueError(f"max_norm must be a finite float > 0, got {max_norm!r}")
    factors = {"add-remove": 1.0, "replace-one": 2.0}
    if neighbouring not in factors:
        raise ValueError(f"neighbouring must be one of {', '.join(factors)}, got {neighbouring!r}")
    return sigma * c * factors[neighbouring]


def gaussian_noise_like(arrays: Mapping[str, np.ndarray], std: float,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Independent ``N(0, std^2)`` entries shaped (and typed) like each array."""
    s = _real(std)
    if s is None or s < 0:
        raise ValueError(f"std must be a finite float >= 0, got {std!r}")
    out = {}
    for k, a in arrays.items():
        a = np.asarray(a)
        dtype = a.dtype if np.issubdtype(a.dtype, np.floating) else np.float32
        out[k] = (rng.standard_normal(a.shape) * s).astype(dtype)
    return out


def privatize_update(delta: Mapping[str, np.ndarray], *, max_norm: float,
                     noise_multiplier: float, rng: np.random.Generator
                     ) -> tuple[dict[str, np.ndarray], float]:
    """Clip the update to ``max_norm`` and add ``N(0, (sigma * max_norm)^2)`` per entry.

    One Gaussian mechanism step; account it as ``step(noise_multiplier=sigma,
    sample_rate=1.0, num_steps=1)``. Returns ``(noised, original_norm)``.
    """
    clipped, norm = clip_update(delta, max_norm)
    noise = gaussian_noise_like(clipped, update_noise_std(noise_multiplier=noise_multiplier,
                                                          max_norm=max_norm), rng)
    return {k: (clipped[k] + noise[k]).astype(clipped[k].dtype) for k in clipped}, norm
