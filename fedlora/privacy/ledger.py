"""A privacy unit's ledger where it lives, and the client's ledger across rounds.

Persistence never forgets spent budget: :func:`save_state` writes atomically and keeps the
previous ledger as ``<path>.bak``; :func:`load_state` falls back to it and raises
:class:`PrivacyStateError` rather than ever returning a fresh (zero-spend) accountant.

A site's ledger file is held under an exclusive lock (:func:`exclusive`) from the budget
check until the spend is saved: a second run that shares the file is refused instead of
spending the same budget at the same time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..results import atomic_write_bytes
from .accounting import history_extends
from .budget import (
    PrivacyBudget,
    PrivacyStateError,
    from_record_dict,
    to_record_dict,
)
from .count import COUNT_NOISE_STD, noised_count

__all__ = ["BudgetExhausted", "Ledger", "LedgerBusy", "exclusive", "load_state", "save_state"]

logger = logging.getLogger(__name__)

_LEDGER_FORMAT = "fedlora-privacy-ledger"


class BudgetExhausted(RuntimeError):
    """The next release would spend more than the privacy budget."""


class LedgerBusy(PrivacyStateError):
    """Another process holds this ledger file (a second run on the same site's budget)."""


@contextlib.contextmanager
def exclusive(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on ``<path>.lock`` or raise :class:`LedgerBusy`.

    The lock is the kernel's (``flock``): it is released when the holder exits or dies, so a
    crashed run never leaves a site locked out.
    """
    import fcntl  # deferred: POSIX only (a site's ledger lock)

    lock_path = Path(path).with_name(Path(path).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LedgerBusy(f"privacy ledger {path} is in use by another run on this site; "
                             "two runs may not spend one budget at once") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _bak(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def _state_digest(state: Mapping[str, Any]) -> str:
    text = json.dumps(state, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _encode(accountant: PrivacyBudget) -> bytes:
    state = accountant.state_dict()
    doc = {"format": _LEDGER_FORMAT, "sha256": _state_digest(state), "state": state}
    return (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("utf-8")


def _decode(data: bytes) -> PrivacyBudget:
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
    return PrivacyBudget.from_state_dict(state)


def _read(path: Path) -> PrivacyBudget:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PrivacyStateError(f"cannot read {path}: {exc}") from exc
    try:
        return _decode(data)
    except PrivacyStateError as exc:
        raise PrivacyStateError(f"{path}: {exc}") from exc


def load_state(path: str | os.PathLike[str]) -> PrivacyBudget | None:
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


def save_state(path: str | os.PathLike[str], accountant: PrivacyBudget, *,
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
        if stored is not None and (
                not history_extends(stored.history, accountant.history)
                or accountant.count_releases[:len(stored.count_releases)]
                != stored.count_releases
                or (accountant.count_releases == stored.count_releases
                    and accountant.count != stored.count)):
            raise PrivacyStateError(
                f"refusing to save a ledger to {path} that forgets spent steps: stored "
                f"{stored.history!r} (count releases {stored.count_releases!r}), new "
                f"{accountant.history!r} ({accountant.count_releases!r})")
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
        atomic_write_bytes(_bak(path), previous)
    atomic_write_bytes(path, data)


class Ledger:
    """A site's privacy budget for one private round, loaded from and saved to where it lives.

    With a ``path`` (a site's node-config ``privacy-state-path``) the file is the record and
    survives restarts; otherwise the accountant lives in ``state`` (a dict-like record of
    Flower's ``context.state``). Use it inside :meth:`session`: with a file, the session holds
    the file's lock from loading the ledger through :meth:`check` to :meth:`spend`, so two
    runs on one site cannot both spend the same budget. A ledger that cannot be read raises,
    never resets to zero. ``plan`` is a :class:`fedlora.privacy.mechanisms.DpPlan`, or a
    function of the site's released example count returning one: then ``terms`` is
    ``(accountant, target_epsilon, delta)`` and ``examples`` the site's true count, released
    once (noised, :mod:`fedlora.privacy.count`) into this ledger when it has none, and only
    after :meth:`check` has found that its release fits the budget; it is recorded and saved
    before anything is computed from it, and every round plans with that value.
    ``site_cap`` is the site's own lifetime epsilon cap (node-config ``max-epsilon``): a
    new ledger is capped there, and no round may take the ledger above it, whatever the run
    asks for.
    """

    def __init__(self, plan: Any, *, path: str | None, state: Mapping[str, Any] | None,
                 server_round: int | None = None, examples: int | None = None,
                 terms: tuple[str, float, float] | None = None,
                 site_cap: float | None = None,
                 worst_probe_round: Any = None) -> None:
        self._planner = plan if callable(plan) else None
        # () -> (sigma, steps): the dearest probe round any released count could have given
        # this site (its probe schedule depends on the count), for rounds a lost ledger spent.
        self._worst_probe_round = worst_probe_round
        self.plan = None if callable(plan) else plan
        if self._planner is not None and terms is None:
            raise ValueError("a ledger that plans from its released count needs its terms "
                             "(accountant, target epsilon, delta)")
        self.terms = terms if terms is not None else \
            (plan.accountant, plan.target_epsilon, plan.delta)
        self.examples = examples
        self.site_cap = site_cap
        self.path = Path(path) if path else None
        self.server_round = server_round  # fixes this round's cost (probe rounds differ)
        self.state = dict(state) if state else None
        self.budget: PrivacyBudget | None = None
        self.fresh = True  # no record anywhere: a client new to this run

    @contextlib.contextmanager
    def session(self) -> Iterator[Ledger]:
        """Lock the ledger file (if any), load the accountant, yield; unlock at the end."""
        lock = exclusive(self.path) if self.path is not None else contextlib.nullcontext()
        with lock:
            self._load()
            yield self

    def _load(self) -> None:
        acc = None
        if self.path is not None:
            acc = load_state(self.path)
            if acc is None and self.state:
                raise PrivacyStateError(
                    f"privacy ledger {self.path} and its backup are gone, but this client "
                    "spent budget earlier in this run; refusing to start from zero")
        elif self.state:
            acc = from_record_dict(self.state)
        self.fresh = acc is None
        accountant, target_epsilon, delta = self.terms
        if acc is None:  # a new ledger is capped at the site's cap, never above it
            acc = PrivacyBudget(accountant, target_epsilon=self.site_cap or target_epsilon,
                                   target_delta=delta)
        if acc.accountant != accountant:
            raise PrivacyStateError(
                f"the privacy ledger uses the '{acc.accountant}' accountant but the run asks for "
                f"'{accountant}'; spent budget cannot be converted")
        if acc.target_delta is not None and acc.target_delta != delta:
            raise PrivacyStateError(
                f"the privacy ledger accounts at delta {acc.target_delta}, the run asks for "
                f"{delta}; a site's budget keeps the delta it started with")
        self.budget = acc
        if self._planner is not None and (acc.count is not None or self.examples is None):
            self.plan = self._planner(acc.count)

    def cap(self) -> float:
        """The epsilon the ledger may not exceed: the lowest of the site's cap, the cap the
        ledger started with (a later run cannot raise a site's budget) and the run's
        target."""
        _, target, _ = self.terms
        caps = [target, self._acc().target_epsilon, self.site_cap]
        return min(c for c in caps if c is not None)

    def release_count(self) -> None:
        """Release the site's noised count into the ledger if it has none, once its charge
        is known to fit the budget (:class:`BudgetExhausted` otherwise, nothing drawn)."""
        acc = self._acc()
        if self.plan is not None or self._planner is None:
            return
        _, _, delta = self.terms
        if acc.would_exceed(noise_multiplier=COUNT_NOISE_STD, sample_rate=1.0, num_steps=1,
                            target_epsilon=self.cap(), delta=delta):
            raise BudgetExhausted("privacy budget exhausted at this site")
        # Recorded (and on file) before anything is computed from it: whatever happens
        # next, this release is charged and never drawn again.
        acc.record_count(noised_count(self.examples), noise_std=COUNT_NOISE_STD)
        if self.path is not None:
            save_state(self.path, acc)
        self.plan = self._planner(acc.count)

    def check(self) -> None:
        """Raise :class:`BudgetExhausted` if this round would take the ledger above its cap.

        The count is released first when the ledger has none, and only if its own charge
        fits. The error says nothing derived from the released count (its message is sent
        to the server): the numbers stay in the site's log.
        """
        self.release_count()
        p, acc = self.plan, self._acc()
        cap = self.cap()
        q, steps = p.cost(self.server_round)
        if acc.would_exceed(noise_multiplier=p.noise_multiplier, sample_rate=q,
                            num_steps=steps, target_epsilon=cap, delta=p.delta):
            after = acc.epsilon_after(noise_multiplier=p.noise_multiplier,
                                      sample_rate=q, num_steps=steps, delta=p.delta)
            logger.warning("privacy budget exhausted: epsilon would reach %.4f > cap %s "
                           "(spent %.4f at delta %s)", after, cap, self.epsilon(), p.delta)
            raise BudgetExhausted("privacy budget exhausted at this site")

    def charge_missed_rounds(self, rounds: int) -> None:
        """Charge ``rounds`` earlier rounds as if this client had trained in every one.

        A resumed simulation starts its clients with empty ``context.state``: the ledgers of
        the rounds before the restart are gone. Assuming the worst (it took part in all of
        them) keeps the reported epsilon an upper bound instead of restarting it at zero.
        """
        acc = self._acc()
        if rounds <= 0 or acc.total_steps > 0:
            return
        self.release_count()
        p = self.plan
        if acc.count_releases:  # the lost ledger's count was released too, at the same noise
            acc.count_releases.insert(0, acc.count_releases[0])
        for r in range(1, rounds + 1):
            q, steps = p.cost(r)
            sigma = p.noise_multiplier
            if 1 <= r <= p.probe_rounds and self._worst_probe_round is not None:
                # The lost rounds ran under the lost count's schedule, not this one's.
                sigma, steps = self._worst_probe_round()
            acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        if self.path is not None:
            save_state(self.path, acc)

    def spend(self) -> float:
        """Record this round's steps, persist the ledger, return the epsilon spent so far."""
        p, acc = self.plan, self._acc()
        q, steps = p.cost(self.server_round)
        acc.step(noise_multiplier=p.noise_multiplier, sample_rate=q, num_steps=steps)
        if self.path is not None:
            save_state(self.path, acc)
        return self.epsilon()

    def record(self) -> dict[str, Any]:
        """The accountant as plain values, for Flower's ``context.state``."""
        return to_record_dict(self._acc())

    def metrics(self) -> dict[str, float | int | str]:
        """What the client reports about its privacy spend: functions of the plan and of how
        many rounds it took part in, never of its data."""
        p = self.plan
        return {"epsilon": self.epsilon(), "delta": p.delta, "noise-multiplier": p.noise_multiplier,
                "sample-rate": p.cost(self.server_round)[0], "steps": self._acc().total_steps,
                "target-epsilon": p.target_epsilon}

    def epsilon(self) -> float:
        acc = self._acc()
        return acc.epsilon(self.plan.delta) if acc.spent_anything else 0.0

    def _acc(self) -> PrivacyBudget:
        if self.budget is None:
            raise RuntimeError("use the ledger inside its session()")
        return self.budget
