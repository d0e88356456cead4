"""A privacy unit's spent budget: :class:`PrivacyBudget`, over an Opacus accountant.

Steps can only be added, so epsilon never decreases; :meth:`PrivacyBudget.load_state_dict`
refuses a state that would forget recorded steps. Files live in :mod:`fedlora.privacy.ledger`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant

from .accounting import (
    History,
    canonical_history,
    check_accountant,
    check_count,
    check_delta,
    check_rate,
    check_sigma,
    epsilon_of_history,
    history_extends,
    real_or_none,
)

__all__ = ["EXCEED_RTOL", "STATE_VERSION", "PrivacyBudget", "PrivacyStateError",
           "from_record_dict", "to_record_dict"]

logger = logging.getLogger(__name__)

#: Version of :meth:`PrivacyBudget.state_dict`; bump when the accounting changes. 2: the
#: site's released example count is in the ledger (code reading only 1 refuses the file,
#: rather than dropping the count's charge).
STATE_VERSION = 2
#: Versions this code reads (1: before the count was released noised).
READABLE_VERSIONS = (1, 2)
#: Relative slack of :meth:`PrivacyBudget.would_exceed` (floating-point noise only).
EXCEED_RTOL = 1e-9


class PrivacyStateError(RuntimeError):
    """A privacy ledger cannot be read or would lose spent budget."""


class PrivacyBudget:
    """A privacy unit's spent budget across rounds (a site's, or the server's for its
    users under user-level DP), over an Opacus accountant named by :attr:`accountant`.

    Holds the Opacus history ``[(noise_multiplier, sample_rate, num_steps), ...]``
    (consecutive equal (sigma, q) merged) of the training steps, and apart from them the
    unit's released example count (``count``, :mod:`fedlora.privacy.count`) with the noise
    std of each time it was released (``count_releases``). Epsilon is that of all of them
    composed (:func:`epsilon_of_history`). Nothing can be taken back, so epsilon never
    decreases.
    """

    def __init__(self, accountant: str = "rdp", *, target_epsilon: float | None = None,
                 target_delta: float | None = None) -> None:
        self._name = check_accountant(accountant)
        self._opacus = PRVAccountant() if self._name == "prv" else RDPAccountant()
        self.target_epsilon = _optional_target(target_epsilon, "target_epsilon")
        self.target_delta = None if target_delta is None else check_delta(target_delta)
        self.count: int | None = None  # the example count last released (noised)
        self.count_releases: list[float] = []  # noise std of every release of the count

    @property
    def accountant(self) -> str:
        """``"rdp"``, ``"prv"`` or ``"rdp-int"`` (:data:`~fedlora.privacy.accounting.ACCOUNTANTS`)."""
        return self._name

    @property
    def history(self) -> History:
        """A copy of the history, ``[(noise_multiplier, sample_rate, num_steps), ...]``."""
        return list(self._opacus.history)

    @property
    def total_steps(self) -> int:
        """Number of mechanism steps recorded."""
        return sum(n for _, _, n in self._opacus.history)

    def __len__(self) -> int:
        return self.total_steps

    @property
    def spent_anything(self) -> bool:
        """Whether any step or count release is recorded."""
        return bool(self.total_steps or self.count_releases)

    def record_count(self, count: int, *, noise_std: float) -> None:
        """Record that the unit released ``count`` with Gaussian noise of std ``noise_std``."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count!r}")
        self.count_releases.append(check_sigma(noise_std))
        self.count = count

    def _full_history(self, extra: History = ()) -> History:
        counts = [(s, 1.0, 1) for s in self.count_releases]
        return [*counts, *self._opacus.history, *extra]

    def __repr__(self) -> str:
        return (f"PrivacyBudget({self.accountant!r}, steps={self.total_steps}, "
                f"history={self._opacus.history!r})")

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
        """Record ``num_steps`` steps of the subsampled Gaussian at (sigma, q)."""
        entry = (check_sigma(noise_multiplier), check_rate(sample_rate),
                 check_count(num_steps, minimum=0))
        if entry[2] == 0:
            return
        self._opacus.history = canonical_history([*self._opacus.history, entry])

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the target delta)."""
        return epsilon_of_history(self._full_history(), delta=self._delta(delta),
                                  accountant=self.accountant)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, num_steps: int,
                      delta: float | None = None) -> float:
        """Epsilon if ``num_steps`` more steps at (sigma, q) were recorded (nothing is recorded)."""
        extra = (check_sigma(noise_multiplier), check_rate(sample_rate),
                 check_count(num_steps, minimum=0))
        history = self._full_history([extra] if extra[2] else [])
        return epsilon_of_history(history, delta=self._delta(delta), accountant=self.accountant)

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
        return check_delta(delta)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: version, the accountant's name (under the key ``mechanism``,
        as files have always had it), history (lists), targets (or None)."""
        return {
            "version": STATE_VERSION,
            "mechanism": self.accountant,
            "history": [[float(s), float(q), int(n)] for s, q, n in self._opacus.history],
            "target_epsilon": self.target_epsilon,
            "target_delta": self.target_delta,
            "count": self.count,
            "count_releases": list(self.count_releases),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` output; a used ledger only accepts a state that extends it.

        Raises :class:`PrivacyStateError` for a malformed state, an unknown version or one
        that would forget recorded steps.
        """
        other = PrivacyBudget.from_state_dict(state)
        if not history_extends(self._opacus.history, other._opacus.history):
            raise PrivacyStateError(
                "state would forget recorded privacy steps: "
                f"{self._opacus.history!r} -> {other._opacus.history!r}")
        if other.count_releases[:len(self.count_releases)] != self.count_releases or (
                len(other.count_releases) == len(self.count_releases)
                and other.count != self.count):
            raise PrivacyStateError(
                "state would forget releases of the example count: "
                f"{self.count_releases!r} -> {other.count_releases!r}")
        self._opacus = other._opacus
        self.count, self.count_releases = other.count, list(other.count_releases)
        self.target_epsilon, self.target_delta = other.target_epsilon, other.target_delta

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyBudget:
        """A new accountant from :meth:`state_dict` output (validated)."""
        try:
            if not isinstance(state, Mapping):
                raise ValueError(f"state must be a mapping, got {type(state).__name__}")
            version = state.get("version")
            if isinstance(version, bool) or version not in READABLE_VERSIONS:
                raise ValueError(f"unsupported state version {version!r} "
                                 f"(this code reads {READABLE_VERSIONS})")
            history = state.get("history")
            if not isinstance(history, (list, tuple)):
                raise ValueError(f"history must be a list, got {history!r}")
            out = cls(state.get("mechanism"), target_epsilon=state.get("target_epsilon"),
                      target_delta=state.get("target_delta"))
            out._opacus.history = canonical_history(history)
            releases = state.get("count_releases") or []
            if not isinstance(releases, (list, tuple)):
                raise ValueError(f"count_releases must be a list, got {releases!r}")
            out.count_releases = [check_sigma(s) for s in releases]
            count = state.get("count")
            if count is not None:
                if isinstance(count, bool) or not isinstance(count, (int, float)) \
                        or count != int(count) or count < 1 or not releases:
                    raise ValueError(f"count must be an integer >= 1 that was released, "
                                     f"got {count!r}")
                out.count = int(count)
            if version == 1 and out.total_steps:
                logger.warning(
                    "this privacy ledger was written by a fedlora that released the site's "
                    "exact example count with every reply; that release is not accounted "
                    "in it (the count is released noised from now on)")
        except (ValueError, TypeError) as exc:
            raise PrivacyStateError(f"invalid privacy state: {exc}") from exc
        return out


def _optional_target(value: Any, name: str) -> float | None:
    if value is None:
        return None
    out = real_or_none(value)
    if out is None or out <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return out


def to_record_dict(accountant: PrivacyBudget) -> dict[str, str | float | int]:
    """Flat ``str -> str/float/int`` form (for a Flower ConfigRecord); history as JSON text.

    Targets that are not set are left out.
    """
    state = accountant.state_dict()
    out: dict[str, str | float | int] = {
        "version": state["version"],
        "mechanism": state["mechanism"],
        "history": json.dumps(state["history"]),
        "total_steps": accountant.total_steps,
        "count_releases": json.dumps(state["count_releases"]),
    }
    if state["count"] is not None:
        out["count"] = int(state["count"])
    for key in ("target_epsilon", "target_delta"):
        if state[key] is not None:
            out[key] = float(state[key])
    return out


def from_record_dict(record: Mapping[str, Any]) -> PrivacyBudget:
    """Inverse of :func:`to_record_dict`; raises :class:`PrivacyStateError` if malformed."""
    try:
        history = json.loads(record["history"])
        state = {
            "version": record["version"],
            "mechanism": record["mechanism"],
            "history": history,
            "target_epsilon": record.get("target_epsilon"),
            "target_delta": record.get("target_delta"),
            "count": record.get("count"),
            "count_releases": json.loads(record.get("count_releases", "[]")),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise PrivacyStateError(f"invalid privacy record: {exc!r}") from exc
    out = PrivacyBudget.from_state_dict(state)
    steps = record.get("total_steps")
    if steps is not None and steps != out.total_steps:
        raise PrivacyStateError(f"privacy record says {steps!r} steps, its history has "
                                f"{out.total_steps}")
    return out
