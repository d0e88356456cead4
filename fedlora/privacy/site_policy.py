"""A site's own privacy policy, from its node-config: no run may weaken it.

Whoever submits a run writes the run-config (``dp-mode``, ``target-epsilon``,
``target-delta``), so a site that followed it would let the server switch its privacy off.
A site states instead, in the node-config its operator gives the SuperNode:

* ``accept-dp-modes``: the ``dp-mode`` values it trains under, comma-separated (e.g.
  ``"sample,update"``); ``"off"`` is how an operator allows non-private runs on purpose.
  A combination such as ``sample+client`` is accepted when its local part (``sample``) is:
  the server's noise on top weakens nothing the site enforces.
* ``max-epsilon``: the site's lifetime epsilon cap. Its privacy ledger is capped there, never
  at the run's ``target-epsilon``; a run asking for a larger target is refused.
* ``max-delta``: the largest ``target-delta`` it accepts.
* ``min-noise-multiplier`` (optional): a floor on the noise multiplier of its local mechanism.
* Distributed DP (``dp-mode = "sample"`` with ``secure-aggregation = true``) adds only a
  share of the noise at each site, ``1/t`` of it for ``dp-min-honest`` t: the site must list
  ``distributed`` in ``accept-dp-modes`` (``sample`` alone means its own DP-SGD noise;
  ``distributed-client`` for ``dp-mode = "client"`` on the secure sum, where the site clips
  and noises its update itself, while ``client`` alone trusts the server with it), and
  ``min-noise-share`` (optional, a fraction in (0, 1]) is the least share it adds: it
  refuses a round whose ``t`` would give it less, so its guarantee needs at most
  ``1 / min-noise-share`` honest contributors, itself included.
* ``require-secure-aggregation`` (optional, default false): the site trains only in runs
  with ``secure-aggregation = true`` and answers no federated evaluation.
* ``secagg-min-cohort`` and ``secagg-min-threshold`` (optional counts): in a secure round
  the fewest sites the round's cohort may have, and the fewest shares that may rebuild one
  of the site's secrets. The site checks them against what the round announces (the round
  config it signs, then the sets of sites that shared their keys and whose masked inputs
  arrived), not against the run-config, and refuses a round below them before it masks or
  trains (:class:`fedlora.secagg.floor.Floor`).
* Pinned identities: a deployed site that relies on secure aggregation for its privacy
  (``require-secure-aggregation``, a ``secagg-min-cohort`` or ``secagg-min-threshold``
  floor, or ``distributed`` in ``accept-dp-modes``) takes part in a secure round only with
  node-config ``secagg-identity`` and ``secagg-peers`` set
  (:mod:`fedlora.secagg.identity`). Without them it would take its neighbours' keys from
  the server, which could then stand in for every neighbour and unmask the site's update
  alone. A simulated site (with a ``partition-id``) may run unpinned.
* ``min-reply-seconds`` (optional): the site holds every training reply (trained or refused)
  until that many seconds after the instruction arrived. A site's compute time grows with
  its data; a server that times replies would learn about it. Replies held to a floor the
  training fits within take the same time whatever the data (a reply that takes longer is
  logged at the site, so its operator can raise the floor).

Every check reads only the run-config, the node-config and the plan (itself a function of
the run-config and of the site's released, already charged count), never the site's data:
whether a site refuses says nothing about its examples. The checks run before the site
touches its data.

A deployed site (no simulation ``partition-id``) without ``accept-dp-modes`` refuses every
run and says which keys to set. A simulated site without a policy follows the run-config:
its data and its operator are the run's own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .mechanisms import dp_mode_choices, parse_dp_mode, site_mechanism

if TYPE_CHECKING:
    from ..run_config import RunConfig
    from .mechanisms import DpPlan

__all__ = ["PINNING_KEYS", "POLICY_KEYS", "PolicyRefusal", "SitePolicy", "hold_reply"]

log = logging.getLogger("fedlora.client")

#: The node-config keys of a site's privacy policy.
POLICY_KEYS = ("accept-dp-modes", "max-epsilon", "max-delta", "min-noise-multiplier",
               "min-noise-share", "min-reply-seconds", "require-secure-aggregation",
               "secagg-min-cohort", "secagg-min-threshold")
#: The node-config keys of a site's pinned identities (:mod:`fedlora.secagg.identity`).
PINNING_KEYS = ("secagg-identity", "secagg-peers")
#: The ``accept-dp-modes`` token of distributed DP (sample-level DP on the secure sum).
DISTRIBUTED = "distributed"
#: ... and of distributed user-level DP (client on the secure sum: the sites clip and noise).
DISTRIBUTED_CLIENT = "distributed-client"
DISTRIBUTED_TOKENS = {"sample": DISTRIBUTED, "client": DISTRIBUTED_CLIENT}

_EXAMPLE = ("--node-config \"accept-dp-modes='sample' max-epsilon=8.0 max-delta=1e-5 "
            "privacy-state-path='<file>'\"")


class PolicyRefusal(ValueError):
    """A run (or a node-config) the site's policy does not accept; the message names the
    node-config key. Saying so leaks nothing about the site's data."""


def _positive(node_config: Mapping[str, Any], key: str, upper: float | None = None
              ) -> float | None:
    value = node_config.get(key)
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = float("nan")
    if isinstance(value, bool) or not math.isfinite(out) or out <= 0 or (
            upper is not None and out >= upper):
        accepted = "a finite float > 0" + ("" if upper is None else f" and < {upper:g}")
        raise PolicyRefusal(f"node-config key '{key}' has bad value {value!r}: expected "
                            f"{accepted}")
    return out


def _count(node_config: Mapping[str, Any], key: str, low: int) -> int | None:
    value = node_config.get(key)
    if value is None or value == "":
        return None
    out = None
    if isinstance(value, int) and not isinstance(value, bool):
        out = value
    elif isinstance(value, float) and value.is_integer():
        out = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        out = int(value.strip())
    if out is None or out < low:
        raise PolicyRefusal(f"node-config key '{key}' has bad value {value!r}: expected a "
                            f"whole number >= {low}")
    return out


def _flag(node_config: Mapping[str, Any], key: str) -> bool:
    value = node_config.get(key, False)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", ""):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise PolicyRefusal(f"node-config key '{key}' has bad value {value!r}: expected true "
                            "or false")
    return value


@dataclass(frozen=True)
class SitePolicy:
    """What a site accepts (``accept_dp_modes`` None: no policy, the run's settings apply)."""

    accept_dp_modes: frozenset[str] | None = None
    max_epsilon: float | None = None
    max_delta: float | None = None
    min_noise_multiplier: float | None = None
    min_noise_share: float | None = None
    min_reply_seconds: float | None = None
    require_secure_aggregation: bool = False
    secagg_min_cohort: int | None = None
    secagg_min_threshold: int | None = None
    deployed: bool = False  # no simulation partition-id: a real site, which needs a policy
    unpinned: tuple[str, ...] = ()  # which of PINNING_KEYS its node-config leaves unset

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SitePolicy:
        """Parse the policy keys; :class:`PolicyRefusal` names a bad key and value."""
        modes = node_config.get("accept-dp-modes")
        accepted = None
        if modes is not None and str(modes).strip() != "":
            names = [m.strip() for m in str(modes).split(",") if m.strip()]
            choices = (*dp_mode_choices(), *DISTRIBUTED_TOKENS.values())
            bad = [m for m in names if m not in choices]
            if bad or not names:
                raise PolicyRefusal(f"node-config key 'accept-dp-modes' has bad value "
                                    f"{modes!r}: expected a comma-separated list of "
                                    f"{', '.join(choices)}")
            accepted = frozenset(names)
        share = _positive(node_config, "min-noise-share")
        if share is not None and share > 1:
            raise PolicyRefusal(f"node-config key 'min-noise-share' has bad value "
                                f"{node_config.get('min-noise-share')!r}: expected a "
                                "fraction in (0, 1]")
        return cls(accept_dp_modes=accepted,
                   max_epsilon=_positive(node_config, "max-epsilon"),
                   max_delta=_positive(node_config, "max-delta", upper=1.0),
                   min_noise_multiplier=_positive(node_config, "min-noise-multiplier"),
                   min_noise_share=share,
                   min_reply_seconds=_positive(node_config, "min-reply-seconds"),
                   require_secure_aggregation=_flag(node_config, "require-secure-aggregation"),
                   secagg_min_cohort=_count(node_config, "secagg-min-cohort", 2),
                   secagg_min_threshold=_count(node_config, "secagg-min-threshold", 1),
                   deployed=node_config.get("partition-id") is None,
                   unpinned=tuple(k for k in PINNING_KEYS if not node_config.get(k)))

    @property
    def relies_on_secure_aggregation(self) -> bool:
        """Whether the site's privacy leans on the secure sum (its mask hides its update)."""
        return bool(self.require_secure_aggregation or self.secagg_min_cohort
                    or self.secagg_min_threshold
                    or bool(self.accept_dp_modes
                         and set(DISTRIBUTED_TOKENS.values()) & self.accept_dp_modes))

    def check_pinned(self) -> None:
        """:class:`PolicyRefusal` for a secure round at a deployed site that relies on it
        and has not pinned its own identity and its peers' (naming the missing keys)."""
        if self.deployed and self.relies_on_secure_aggregation and self.unpinned:
            raise PolicyRefusal(
                "a deployed site relying on secure aggregation needs pinned identities: set "
                f"node-config key {' and '.join(repr(k) for k in self.unpinned)} (without "
                "them the server could stand in for every neighbour and unmask this site)")

    @property
    def private_only(self) -> bool:
        """Whether the site refuses to release anything un-noised about its data."""
        return self.accept_dp_modes is not None and "off" not in self.accept_dp_modes

    def check_run(self, cfg: RunConfig) -> None:
        """Refuse a run weaker than the policy (before the site touches its data), and a
        secure run that :meth:`check_pinned` refuses."""
        self._check_run(cfg)
        if cfg.secure_aggregation:
            self.check_pinned()

    def _check_run(self, cfg: RunConfig) -> None:
        if self.require_secure_aggregation and not cfg.secure_aggregation:
            raise PolicyRefusal("the run does not aggregate securely and this site's "
                                "node-config key 'require-secure-aggregation' is true")
        if self.accept_dp_modes is None:
            if self.deployed:
                raise PolicyRefusal(
                    "this site has no privacy policy: its operator sets node-config key "
                    f"'accept-dp-modes' (and 'max-epsilon', 'max-delta'), e.g. {_EXAMPLE}; "
                    "accept-dp-modes='off' allows non-private runs on purpose")
            return
        mode = cfg.dp_mode
        local = site_mechanism(cfg)
        if cfg.secure_aggregation and mode in DISTRIBUTED_TOKENS:  # a share of the noise
            token = DISTRIBUTED_TOKENS[mode]
            if token not in self.accept_dp_modes:
                raise PolicyRefusal(
                    f"the run's dp-mode = '{mode}' with secure-aggregation = true adds only a "
                    "share of the noise at each site (distributed DP), and this site's "
                    f"node-config key 'accept-dp-modes' does not list '{token}'")
            missing = [k for k, v in (("min-noise-share", self.min_noise_share),
                                      ("min-reply-seconds", self.min_reply_seconds),
                                      ("max-epsilon", self.max_epsilon),
                                      ("max-delta", self.max_delta))
                       if v is None]
            if self.deployed and missing:
                raise PolicyRefusal(
                    "distributed DP at a deployed site needs node-config keys "
                    f"{' and '.join(repr(k) for k in missing)}: 'min-noise-share' bounds how "
                    "little noise it adds (else the server's cohort and dp-min-honest decide "
                    "it; pinned peers stop invented sites, not colluding ones), "
                    "'min-reply-seconds' keeps its compute time, which grows with its data, "
                    "from the server, and 'max-epsilon' and 'max-delta' keep the budget its "
                    "own (else the first run's target-epsilon and target-delta, which the "
                    "server writes, would cap its ledger)")
        elif mode not in self.accept_dp_modes and (
                local is None or local.name not in self.accept_dp_modes):
            raise PolicyRefusal(f"the run's dp-mode = '{mode}' is not accepted by this site "
                                f"(node-config key 'accept-dp-modes' = "
                                f"'{','.join(sorted(self.accept_dp_modes))}')")
        if not parse_dp_mode(mode):
            return  # off, allowed on purpose: nothing to cap
        if self.max_delta is not None and cfg.target_delta > self.max_delta:
            raise PolicyRefusal(f"the run's target-delta = {cfg.target_delta} exceeds this "
                                f"site's node-config key 'max-delta' = {self.max_delta}")
        if local is not None and self.max_epsilon is not None \
                and cfg.target_epsilon > self.max_epsilon:
            raise PolicyRefusal(f"the run's target-epsilon = {cfg.target_epsilon} exceeds "
                                f"this site's node-config key 'max-epsilon' = "
                                f"{self.max_epsilon}")

    def check_plan(self, plan: DpPlan) -> None:
        """Refuse a plan whose noise multiplier is below the site's floor."""
        if self.min_noise_multiplier is not None \
                and plan.noise_multiplier < self.min_noise_multiplier:
            # The plan's sigma follows from the released count: it stays in the site's log.
            raise PolicyRefusal(f"the run's noise multiplier is below this site's "
                                f"node-config key 'min-noise-multiplier' = "
                                f"{self.min_noise_multiplier}")

    def check_noise_share(self, contributors: int, own_noise_multiplier: float) -> None:
        """Refuse a distributed round in which this site would add less than its
        ``min-noise-share`` of the noise (``1 / contributors``), or noise whose own
        multiplier (its share alone, as a Gaussian-equivalent) is below its
        ``min-noise-multiplier``."""
        if self.min_noise_share is not None and 1.0 / contributors < self.min_noise_share:
            raise PolicyRefusal(f"the round's dp-min-honest and dp-max-dropouts give this "
                                f"site a noise share of 1/{contributors}, below its "
                                f"node-config key 'min-noise-share' = "
                                f"{self.min_noise_share:g}")
        own = own_noise_multiplier
        if self.min_noise_multiplier is not None and own < self.min_noise_multiplier:
            raise PolicyRefusal(f"this site's share of the noise, noise multiplier {own:.4g}, "
                                f"is below its node-config key 'min-noise-multiplier' = "
                                f"{self.min_noise_multiplier:g}")

    def epsilon_cap(self, run_target: float) -> float:
        """The epsilon the site's ledger may never exceed: the site's own cap when it has
        one, else (a simulated site without a policy) the run's target."""
        return self.max_epsilon if self.max_epsilon is not None else run_target

    def allows_plain_evaluation(self) -> bool:
        """Whether the site may answer federated evaluation (an un-noised loss/accuracy)."""
        if self.require_secure_aggregation:
            return False
        if self.accept_dp_modes is None:
            return not self.deployed
        return "off" in self.accept_dp_modes


def hold_reply(started: float, node_config: Mapping[str, Any]) -> None:
    """Sleep until ``min-reply-seconds`` after ``started`` (a bad value was refused already)."""
    try:
        hold = SitePolicy.from_node_config(node_config).min_reply_seconds or 0.0
    except PolicyRefusal:
        hold = 0.0
    left = started + hold - time.monotonic()
    if left > 0:
        time.sleep(left)
    elif hold:  # stays at the site: how long it took is about its data
        log.warning("This reply took %.1f s, more than node-config 'min-reply-seconds' = "
                    "%g: its timing may tell the server about this site's data; raise the "
                    "floor", hold - left, hold)
