"""DP mechanisms by name: what each one protects, where it runs, and how a run plans it.

A mechanism is one class registered with :func:`register` in its own module
(:mod:`~fedlora.privacy.sample_level`, :mod:`~fedlora.privacy.update_level`,
:mod:`~fedlora.privacy.user_level`). It declares

* ``name``: its ``dp-mode`` name; a :class:`ClientMechanism` runs on every client, a
  :class:`ServerMechanism` on the server;
* ``neighbouring``: the neighbouring relation its guarantee is stated for, and against whom;
* ``needs_linear_aggregator``: whether it works only with aggregators whose global adapter
  is the weighted mean of what clients send (``linear`` in :mod:`fedlora.aggregation`);
* ``check_config(cfg)``: its run-config checks, before round 1, naming the key;
* a client mechanism: ``plan_round(cfg, n)`` (its sample rate and accounted steps per
  round, from which :meth:`ClientMechanism.plan` calibrates sigma for the whole run),
  ``train`` (the local training, private or not) and ``release`` (what leaves the site);
* a server mechanism: ``server_hook(cfg)``, the object the strategy releases through.

``dp-mode`` is ``off``, one mechanism, or a client mechanism ``+`` a server mechanism that
accepts it (``sample+client``). Adding a mechanism is one new module and one import line in
``fedlora/privacy/__init__.py``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..aggregation import METHODS  # each aggregator declares whether it is linear
from ..config import ConfigError
from ..model_cache import _locked, cache_root
from ..probe import train_head_as_configured
from ..results import atomic_write_text
from ..training import train_as_configured
from . import (
    accounting,  # calibrate_noise_multiplier looked up at call time (tests watch it)
)
from .accounting import check_count, epsilon_of_history, planned_steps, real_or_none
from .count import COUNT_NOISE_STD, UNWEIGHTED, count_history

if TYPE_CHECKING:
    from ..run_config import RunConfig

__all__ = ["ClientMechanism", "DpPlan", "Mechanism", "PrivacyConfigError", "ServerMechanism",
           "check_dp_config", "check_privacy_params", "client_mechanism", "dp_mode_choices",
           "get_mechanism", "parse_dp_mode", "register", "server_mechanism", "site_mechanism"]

log = logging.getLogger(__name__)


class PrivacyConfigError(ConfigError):
    """A privacy run-config value is not acceptable (a ValueError naming key, value, expected)."""


@dataclass(frozen=True)
class DpPlan:
    """What one client's private round costs: ``steps`` Gaussian steps at rate ``sample_rate``."""

    mode: str
    noise_multiplier: float
    sample_rate: float
    steps: int  # accounted steps per round
    target_epsilon: float
    delta: float
    accountant: str
    probe_rounds: int = 0  # the first rounds train the head alone: probe_steps steps at q = 1
    probe_steps: int = 0
    probe_learning_rate: float = 0.0  # the probe's SGD rate (with probe_steps, the site's own)
    # The site's example count as released (noised, fedlora.privacy.count), which sets q,
    # a full-batch step's denominator and the reply's weight; None: no count is released.
    examples: int | None = None
    count_noise: float = 0.0  # its noise std, charged once in the plan's calibration

    @property
    def weight(self) -> int:
        """The weight the site's reply carries: its released count, else the same for all."""
        return self.examples if self.examples is not None else UNWEIGHTED

    def cost(self, server_round: int | None) -> tuple[float, int]:
        """``(sample_rate, steps)`` accounted for ``server_round`` (None: only for a plan
        without probe rounds, whose rounds all cost the same)."""
        if server_round is None:
            if self.probe_rounds:
                raise ValueError("a plan with probe rounds needs the round to cost it")
            return self.sample_rate, self.steps
        if 1 <= server_round <= self.probe_rounds:
            return 1.0, self.probe_steps
        return self.sample_rate, self.steps


class Mechanism:
    """A DP mechanism (see the module docstring for what each attribute means)."""

    name: ClassVar[str]
    neighbouring: ClassVar[str]
    # Releases a noised mean of what clients send: needs an aggregator whose global
    # adapter is that mean (``Method.linear``).
    needs_linear_aggregator: ClassVar[bool] = False
    aggregator_reason: ClassVar[str] = ""  # why the others are refused
    probe: ClassVar[bool] = False  # serves linear-probe rounds (run-config probe-rounds > 0)

    def recipe(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Run-config values (kebab-case keys) that this mechanism's DP recipe gives keys
        left at their default when ``dp-recipe = auto``; ``values`` is the whole run-config."""
        return {}

    def describe(self, cfg: RunConfig) -> str:
        """The run's plan under this mechanism in one line ("" when there is nothing to say
        beyond the run-config); the server logs it once at the start."""
        return ""

    def check_config(self, cfg: RunConfig) -> None:
        """Refuse a run-config this mechanism cannot serve (ConfigError naming the key)."""
        if getattr(cfg, "probe_rounds", 0) and not self.probe:
            raise ConfigError("probe-rounds", cfg.probe_rounds,
                              f"0 with dp-mode = '{cfg.dp_mode}' ({self.name} noises every "
                              "tensor sent, the LoRA factors a probe round leaves alone)")
        if self.needs_linear_aggregator:
            method = METHODS.get(cfg.aggregator)
            if method is not None and not method.linear:
                linear = [name for name, m in METHODS.items() if m.linear]
                raise ConfigError("aggregator", cfg.aggregator,
                                  f"one of {', '.join(linear)} with dp-mode = "
                                  f"'{cfg.dp_mode}' ({self.name}: {self.aggregator_reason})")


class ClientMechanism(Mechanism):
    """A mechanism run by each client on its own data, with its own ledger."""

    def check_config(self, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.local_epochs > 0:  # epochs make the steps, and so the reply, depend on n
            raise ConfigError("local-epochs", cfg.local_epochs,
                              f"0 with dp-mode = '{cfg.dp_mode}' (a private client runs "
                              "local-steps steps, however many examples it holds)")

    #: Whether the site releases its (noised) example count: the mechanism needs one (q),
    #: and its relation keeps the count bounded (fedlora.privacy.count).
    releases_count: ClassVar[bool] = True

    def plan_round(self, cfg: RunConfig, num_examples: int | None) -> tuple[float, int]:
        """``(sample_rate, accounted steps per round)``."""
        raise NotImplementedError

    def plan(self, cfg: RunConfig, num_examples: int | None) -> DpPlan:
        """The client's plan from its *released* example count (None when the mechanism
        releases none), with sigma calibrated for every planned round (worst case: the
        client takes part in all of them) and for the count's one release."""
        if self.releases_count and num_examples is None:
            raise ValueError(f"dp-mode '{self.name}' plans from the site's released count")
        check_privacy_params(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                             max_grad_norm=cfg.max_grad_norm,
                             num_examples=num_examples if self.releases_count else None,
                             mode=cfg.dp_mode)
        q, per_round = self.plan_round(cfg, num_examples)
        probe = min(getattr(cfg, "probe_rounds", 0), cfg.num_server_rounds)
        count_noise = COUNT_NOISE_STD if self.releases_count else 0.0
        accountant = self.plan_accountant(cfg)

        def sigma_for(probe_steps: int) -> float:
            lora_rounds = cfg.num_server_rounds - probe
            phases = []
            if lora_rounds:
                phases.append((q, planned_steps(num_rounds=lora_rounds, local_steps=per_round)))
            if probe:
                phases.append((1.0, planned_steps(num_rounds=probe, local_steps=probe_steps)))
            return calibrated_sigma(cfg.target_epsilon, cfg.target_delta, *phases[0],
                                    accountant, tuple(phases[1:]),
                                    tuple(count_history(count_noise)))

        probe_steps, probe_lr = (self.probe_schedule(cfg, num_examples, sigma_for) if probe
                                 else (0, 0.0))
        return DpPlan(mode=self.name, noise_multiplier=sigma_for(probe_steps), sample_rate=q,
                      steps=per_round, target_epsilon=cfg.target_epsilon,
                      delta=cfg.target_delta, accountant=accountant, probe_rounds=probe,
                      probe_steps=probe_steps, probe_learning_rate=probe_lr,
                      examples=num_examples if self.releases_count else None,
                      count_noise=count_noise)

    def plan_accountant(self, cfg: RunConfig) -> str:
        """The accountant of this mechanism's ledgers (the run-config's ``accountant``)."""
        return cfg.accountant

    def probe_schedule(self, cfg: RunConfig, num_examples: int | None,
                       sigma_for: Any) -> tuple[int, float]:
        """``(steps, learning rate)`` of this site's probe rounds; ``sigma_for(steps)`` is
        the noise multiplier a schedule of that many steps would get. The run-config's."""
        return int(getattr(cfg, "probe_steps", 0)), float(getattr(cfg, "probe_learning_rate",
                                                                   0.0))

    def reply_norm_bound(self, cfg: RunConfig, server_round: int, released_count: int,
                         dims: int, start_norm: float) -> float | None:
        """The largest change (L2 norm) an honest reply of this round can make, from the
        plan (:mod:`fedlora.privacy.reply_bound`), for a site that released
        ``released_count`` and a reply of ``dims`` trained entries; None: the mechanism
        noises nothing it sends, so the server's ``max-update-norm`` applies."""
        return None

    def train(self, model: Any, data: Any, indices: np.ndarray, *, plan: DpPlan, cfg: RunConfig,
              seed: int) -> Any:
        """Local training (non-private unless the mechanism says otherwise)."""
        return train_as_configured(model, data, indices, cfg, seed)

    def train_head(self, model: Any, data: Any, indices: np.ndarray, *, plan: DpPlan | None,
                   cfg: RunConfig) -> Any:
        """A linear-probe round: the head alone (non-private unless the mechanism says so)."""
        return train_head_as_configured(model, data, indices, cfg)

    def release(self, trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], *,
                plan: DpPlan, cfg: RunConfig) -> dict[str, np.ndarray]:
        """What leaves the site (the trained tensors, unless the mechanism noises them)."""
        return dict(trained)




class ServerMechanism(Mechanism):
    """A mechanism run by the server over the clients' replies, with the server's ledger."""

    #: Client mechanisms it may be combined with (``<client>+<server>``).
    accepts_local: ClassVar[tuple[str, ...]] = ()

    def server_hook(self, cfg: RunConfig) -> Any:
        raise NotImplementedError

    def site_side(self, cfg: RunConfig) -> ClientMechanism | None:
        """What each site runs instead when it, not the server, must clip and noise
        (``secure-aggregation = true``: the server sees only a sum); None: nothing."""
        return None


_REGISTRY: dict[str, Mechanism] = {}


def register(cls: type[Mechanism]) -> type[Mechanism]:
    """Class decorator: make a mechanism reachable by its ``dp-mode`` name."""
    if cls.name in _REGISTRY or cls.name == "off" or "+" in cls.name:
        raise ValueError(f"cannot register a DP mechanism named {cls.name!r}")
    _REGISTRY[cls.name] = cls()
    return cls


def get_mechanism(name: str) -> Mechanism:
    return _REGISTRY[name]


def dp_mode_choices() -> tuple[str, ...]:
    """Every accepted ``dp-mode``: off, each mechanism, each accepted client+server pair."""
    out = ["off", *_REGISTRY]
    for server in _REGISTRY.values():
        if isinstance(server, ServerMechanism):
            out += [f"{local}+{server.name}" for local in server.accepts_local]
    return tuple(out)


def parse_dp_mode(text: Any) -> tuple[Mechanism, ...]:
    """The mechanisms named by ``dp-mode`` (``off``: none); PrivacyConfigError otherwise."""
    choices = dp_mode_choices()
    if not isinstance(text, str) or text not in choices:
        raise PrivacyConfigError("dp-mode", text, f"one of {', '.join(choices)}")
    return () if text == "off" else tuple(_REGISTRY[p] for p in text.split("+"))


def client_mechanism(dp_mode: str) -> ClientMechanism | None:
    """The part of ``dp-mode`` each client runs, or None."""
    found = [m for m in parse_dp_mode(dp_mode) if isinstance(m, ClientMechanism)]
    return found[0] if found else None


def site_mechanism(cfg: RunConfig) -> ClientMechanism | None:
    """What a site runs under ``cfg``: the local part of ``dp-mode``, or the site's side of
    its server mechanism on the secure sum (distributed user-level DP); None: nothing."""
    local = client_mechanism(cfg.dp_mode)
    if local is not None:
        return local
    server = server_mechanism(cfg.dp_mode)
    return None if server is None else server.site_side(cfg)


def server_mechanism(dp_mode: str) -> ServerMechanism | None:
    """The part of ``dp-mode`` the server runs, or None."""
    found = [m for m in parse_dp_mode(dp_mode) if isinstance(m, ServerMechanism)]
    return found[0] if found else None


def check_dp_config(cfg: RunConfig) -> None:
    """Every run-config check of the mechanisms ``dp-mode`` names (before round 1)."""
    modes = parse_dp_mode(cfg.dp_mode)
    check_privacy_params(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                         max_grad_norm=cfg.max_grad_norm, mode=cfg.dp_mode)
    for mechanism in modes:
        mechanism.check_config(cfg)
    site = site_mechanism(cfg)
    if site is not None and site not in modes:
        site.check_config(cfg)


def check_privacy_params(*, target_epsilon: float, target_delta: float, max_grad_norm: float,
                         num_examples: int | None = None, mode: str) -> tuple[Mechanism, ...]:
    """Validate the privacy run-config values; return the parsed ``dp-mode``.

    Raises :class:`PrivacyConfigError` naming the key, the value and what is accepted:
    epsilon must be finite and > 0, delta in (0, 1) and below ``1/num_examples`` when
    ``num_examples`` is given (a larger delta allows releasing a record outright),
    max-grad-norm finite and > 0. Values are checked even with ``dp-mode = off``.
    """
    modes = parse_dp_mode(mode)
    eps = real_or_none(target_epsilon)
    if eps is None or eps <= 0:
        raise PrivacyConfigError("target-epsilon", target_epsilon, "a finite float > 0")
    delta = real_or_none(target_delta)
    if delta is None or not 0 < delta < 1:
        raise PrivacyConfigError("target-delta", target_delta, "a float in (0, 1)")
    if num_examples is not None:
        n = check_count(num_examples, minimum=1, name="num_examples")
        if delta >= 1 / n:
            raise PrivacyConfigError(
                "target-delta", target_delta,
                f"a float below 1/n = {1 / n:.6g} for n = {n} examples (typically <= 1/(10 n))")
    norm = real_or_none(max_grad_norm)
    if norm is None or norm <= 0:
        raise PrivacyConfigError("max-grad-norm", max_grad_norm, "a finite float > 0")
    return modes


# --------------------------------------------------------------------------- calibration

SIGMA_CACHE_FILE = "noise-multipliers.json"


@functools.lru_cache(maxsize=256)
def calibrated_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str, more_phases: tuple[tuple[float, int], ...] = (),
                     fixed: tuple[tuple[float, float, int], ...] = ()) -> float:
    """The calibrated noise multiplier, remembered in this process and in a small file in the
    user cache folder shared by every process (a deployed site starts a process per message;
    a simulation worker serves clients of many sizes). A remembered value is used only if
    it still meets the target under the accountant, so a stale or edited file can cost a
    recalibration, never privacy."""
    key = f"{accountant}|{target_epsilon!r}|{delta!r}|{sample_rate!r}|{steps}"
    key += "".join(f"|{q!r}x{n}" for q, n in more_phases)
    key += "".join(f"|fixed {s!r},{q!r}x{n}" for s, q, n in fixed)
    path = cache_root() / SIGMA_CACHE_FILE
    cached = _read_sigmas(path).get(key)
    phases = ((sample_rate, steps), *more_phases)
    if isinstance(cached, (int, float)) and cached > 0:
        spent = epsilon_of_history([*fixed, *((float(cached), q, n) for q, n in phases)],
                                   delta=delta, accountant=accountant)
        if spent <= target_epsilon:
            return float(cached)
        log.warning("ignoring a remembered noise multiplier %s that gives epsilon %.4f > "
                    "target %s; recalibrating", cached, spent, target_epsilon)
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
        steps=steps, accountant=accountant, more_phases=more_phases, fixed_history=fixed)
    _remember_sigma(path, key, sigma)
    return sigma


def _read_sigmas(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember_sigma(path: Path, key: str, sigma: float) -> None:
    """Add one entry to the shared file (best effort: a read-only cache just is not used)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_name(path.name + ".lock")):
            data = _read_sigmas(path)
            data[key] = sigma
            atomic_write_text(path, json.dumps(data, indent=0, sort_keys=True) + "\n")
    except OSError as e:
        log.debug("cannot remember the noise multiplier in %s: %s", path, e)
