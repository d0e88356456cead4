"""Differential privacy in fedlora: accounting, ledgers and the DP mechanisms.

Layout (one concept per module):

* :mod:`~fedlora.privacy.accounting`: pure epsilon math over a history of subsampled
  Gaussian steps (RDP, PRV), calibration of the noise multiplier.
* :mod:`~fedlora.privacy.budget`: a privacy unit's spent budget (``PrivacyBudget``).
* :mod:`~fedlora.privacy.ledger`: where a ledger lives (a site's file, under an exclusive
  lock, with a backup; or Flower's ``context.state``) and the client's round ledger.
* :mod:`~fedlora.entropy` (outside the package, as training uses it too): the generators
  every guarantee rests on (OS entropy).
* :mod:`~fedlora.privacy.gaussian`: clipping and Gaussian noise for whole updates.
* :mod:`~fedlora.privacy.mechanisms`: the registry of mechanisms, ``dp-mode`` parsing,
  privacy run-config checks and the client's plan.
* One module per mechanism, registered by name: :mod:`~fedlora.privacy.sample_level`
  (``sample``, DP-SGD), :mod:`~fedlora.privacy.update_level` (``update``, DP-LoRA update
  noise), :mod:`~fedlora.privacy.user_level` (``client``, user-level DP-FedAvg).

What a site releases under a DP mode is listed in :data:`RELEASED_TRAIN_METRICS`; the
server drops anything else a client reports (:func:`released_metrics`). How privacy values
are named in replies and in privacy.csv: :mod:`~fedlora.privacy.metrics`. A site's example
count: :mod:`~fedlora.privacy.count`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..adapters import is_factor_key
from ..entropy import private_numpy_rng, private_torch_generator
from .accounting import (
    ACCOUNTANTS,
    PRV_EPS_ERROR,
    RDP_ORDERS,
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_dp_accounting,
    epsilon_of_history,
    planned_steps,
)
from .budget import (
    STATE_VERSION,
    PrivacyBudget,
    PrivacyStateError,
    from_record_dict,
    to_record_dict,
)
from .gaussian import clip_update, gaussian_noise_like, global_norm
from .ledger import (
    BudgetExhausted,
    Ledger,
    LedgerBusy,
    exclusive,
    load_state,
    save_state,
)
from .mechanisms import (
    ClientMechanism,
    DpPlan,
    Mechanism,
    PrivacyConfigError,
    ServerMechanism,
    calibrated_sigma,
    check_dp_config,
    check_privacy_params,
    client_mechanism,
    dp_mode_choices,
    get_mechanism,
    parse_dp_mode,
    server_mechanism,
    site_mechanism,
)

# The mechanisms: importing a module registers it (one line per mechanism).
from . import sample_level as _sample_level  # noqa: E402,F401  isort: skip
from . import update_level as _update_level  # noqa: E402,F401  isort: skip
from . import user_level as _user_level  # noqa: E402,F401  isort: skip
from .update_level import privatize_reply, update_noise_std  # noqa: E402  isort: skip
from .metrics import (  # noqa: E402  isort: skip
    PRIVACY_COLUMNS, RELEASED_TRAIN_METRICS, from_metrics, privacy_row, released_metrics,
    to_metrics)
from .user_level import CentralDp  # noqa: E402  isort: skip

if TYPE_CHECKING:
    from ..run_config import RunConfig

__all__ = [
    "ACCOUNTANTS", "BudgetExhausted", "CentralDp", "PrivacyBudget", "ClientMechanism",
    "DpPlan", "Ledger", "LedgerBusy", "Mechanism", "PRIVACY_COLUMNS",
    "PRV_EPS_ERROR", "PrivacyConfigError", "PrivacyStateError", "RDP_ORDERS",
    "RELEASED_TRAIN_METRICS", "STATE_VERSION", "ServerMechanism", "calibrate_noise_multiplier",
    "calibrated_sigma", "check_dp_config", "check_privacy_params", "client_mechanism",
    "clip_update", "compute_epsilon", "dp_mode_choices", "epsilon_dp_accounting",
    "epsilon_of_history", "exclusive", "from_metrics", "from_record_dict",
    "gaussian_noise_like", "get_mechanism", "global_norm", "load_state", "parse_dp_mode",
    "plan_for", "planned_steps", "privacy_row", "private_numpy_rng", "private_torch_generator",
    "privatize_reply", "released_metrics", "reply_norm_bound", "reply_weights", "save_state", "server_hook",
    "server_mechanism", "site_mechanism", "to_metrics", "to_record_dict", "update_noise_std",
]


def plan_for(cfg: RunConfig, num_examples: int) -> DpPlan | None:
    """The client's plan under ``cfg.dp_mode`` (None when no mechanism runs on clients)."""
    mechanism = site_mechanism(cfg)
    return None if mechanism is None else mechanism.plan(cfg, num_examples)


def reply_norm_bound(cfg: RunConfig) -> Callable[..., float | None] | None:
    """``bound(server_round, released_count, reply_state, start_norm)``: the largest
    change an honest reply can make under the clients' mechanism (None for a reply it
    does not noise), or None when no mechanism runs on clients. A probe round trains
    only the head, so only the head's entries count as noised there."""
    mechanism = client_mechanism(cfg.dp_mode)
    if mechanism is None:
        return None

    def bound(server_round: int, released_count: int, reply_state: Mapping[str, Any],
              start_norm: float = 0.0) -> float | None:
        probe = 1 <= server_round <= getattr(cfg, "probe_rounds", 0)
        dims = sum(int(a.size) for k, a in reply_state.items()
                   if not (probe and is_factor_key(k)))
        return mechanism.reply_norm_bound(cfg, server_round, int(released_count), dims,
                                          float(start_norm))

    return bound


def reply_weights(cfg: RunConfig) -> str:
    """What a reply's ``num-examples`` may be (``fedlora.app.server.strategy.LoraStrategy``): the
    site's released count, kept for the whole run, under a client mechanism that releases
    one; 1 under one that releases none; anything without a client mechanism, and under
    user-level DP (the server's release ignores weights, and which nodes replied is
    withheld, so no count is kept per node)."""
    mechanism = client_mechanism(cfg.dp_mode)
    if mechanism is None or server_mechanism(cfg.dp_mode) is not None:
        return "claimed"
    return "released-once" if mechanism.releases_count else "uniform"


def server_hook(cfg: RunConfig) -> Any:
    """The server mechanism's release object (:class:`CentralDp`), or None."""
    mechanism = server_mechanism(cfg.dp_mode)
    return None if mechanism is None else mechanism.server_hook(cfg)
