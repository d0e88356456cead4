"""Distributed user-level DP (``dp-mode = "client"`` with ``secure-aggregation = true``):
each site clips its update and adds a share of Skellam noise; the server sees only the sum.
The tests play the attacker: sensitivity whatever the update, noise from OS entropy and of
the planned size, the ledger's cap, an audit with canary sites, and real Flower rounds."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from fedlora import distributed_dp, privacy
from fedlora.app.server.secure_aggregation import SecureAggregationStrategy
from fedlora.config import ConfigError
from fedlora.privacy import BudgetExhausted, Ledger, audit
from fedlora.privacy.accounting import epsilon_dp_accounting, epsilon_of_history
from fedlora.privacy.distributed_user_level import (
    DistributedUserLevel,
    participation_cap,
    update_spec,
    update_vector,
)
from fedlora.privacy.site_policy import PolicyRefusal, SitePolicy
from fedlora.privacy.skellam import INTEGER_ORDERS, epsilon_of_rdp
from fedlora.runtime import parse_run_config
from fedlora.secagg import SecAggServer

from .test_simulation import run_in_process

BASE = {"dp-mode": "client", "secure-aggregation": True}
PAYLOAD = {"a.lora_B.weight": np.zeros((6, 4)), "a.lora_A.weight": np.zeros((4, 5)),
           "classifier.weight": np.zeros((2, 3))}


def test_the_site_runs_the_mechanism_and_the_server_releases_nothing_itself():
    cfg = parse_run_config({**BASE, "num-server-rounds": 10, "fraction-train": 0.25})
    assert isinstance(privacy.site_mechanism(cfg), DistributedUserLevel)
    assert privacy.server_hook(cfg) is None  # no server-side clipping or noise
    assert participation_cap(cfg) == 3  # ceil(10 x 0.25)
    assert participation_cap(parse_run_config({**BASE, "participation-cap": 1})) == 1
    trusted = parse_run_config({"dp-mode": "client"})
    assert privacy.site_mechanism(trusted) is None and privacy.server_hook(trusted) is not None


@pytest.mark.parametrize("changes, key", [
    ({"aggregator": "svd"}, "aggregator"),
    ({"aggregator": "stack"}, "aggregator"),
    ({"accountant": "prv"}, "accountant"),
    ({"participation-cap": 9}, "participation-cap"),  # more than the 8 rounds
    ({"probe-rounds": 2}, "probe-rounds"),
])
def test_what_it_cannot_serve_is_refused_naming_the_key(changes, key):
    with pytest.raises(ConfigError) as info:
        parse_run_config({**BASE, **changes})
    assert info.value.key == key
    with pytest.raises(ConfigError):  # a local mechanism under it is not built
        parse_run_config({**BASE, "dp-mode": "sample+client"})


def test_one_site_moves_the_sum_by_at_most_the_stated_sensitivity_whatever_it_trained():
    spec = update_spec(PAYLOAD)
    assert spec.count_weight == 0 and spec.length == 24 + 20 + 6 + 1
    rng = np.random.default_rng(0)
    zero = update_vector(PAYLOAD, PAYLOAD, clip=0.5)
    assert not zero.any()  # update 0: the zero-out neighbour sends exactly nothing
    worst_l2 = worst_l1 = 0.0
    for scale in (1e-4, 0.1, 0.5, 1e9):  # inside the clip, at it, far outside
        for _ in range(100):
            trained = {k: v + rng.standard_normal(v.shape) * scale for k, v in PAYLOAD.items()}
            trained["classifier.weight"][0, 0] = np.nan  # counts as 0, never an error
            d = update_vector(trained, PAYLOAD, clip=0.5).astype(np.float64) - zero
            worst_l2 = max(worst_l2, float(np.linalg.norm(d)))
            worst_l1 = max(worst_l1, float(np.abs(d).sum()))
    assert worst_l2 <= spec.l2_sensitivity and worst_l1 <= spec.l1_sensitivity
    assert worst_l2 > 0.95 * spec.units  # the bound is reached: the clip is C, not 2C
    # Unbiased: the mean of many encodings is the scaled update; the coins are not seeded.
    small = {k: v + 1e-3 for k, v in PAYLOAD.items()}
    mean = np.mean([update_vector(small, PAYLOAD, clip=1.0)[:-1] for _ in range(3000)], axis=0)
    assert np.allclose(mean, 1e-3 * spec.units, atol=0.1)
    np.random.seed(0)
    first = update_vector(small, PAYLOAD, clip=1.0)
    np.random.seed(0)
    assert not np.array_equal(first, update_vector(small, PAYLOAD, clip=1.0))


def test_the_sum_of_t_shares_has_the_planned_variance():
    cfg = parse_run_config({**BASE, "dp-min-honest": 4.0})
    payload = {"a.lora_B.weight": np.zeros((100, 100))}
    release = distributed_dp.release_for(cfg, payload, 3)
    assert release.kind == "user-update" and release.max_terms == 1
    assert release.sigma == DistributedUserLevel().sigma(cfg)
    spec = release.spec
    zeros = np.zeros(spec.length, np.int64)
    shares = [distributed_dp.noised(zeros, sigma=release.sigma, cohort=6, cfg=cfg, spec=spec)
              for _ in range(4)]  # t = 4 of a cohort of 6
    total = np.sum(shares, axis=0).astype(np.float64)
    v = spec.variance(release.sigma)
    assert abs(total.var() / v - 1) < 5 * math.sqrt(2 / spec.length)
    assert abs(shares[0].astype(np.float64).var() / (v / 4) - 1) < 5 * math.sqrt(2 / spec.length)


def test_the_ledger_caps_participation_and_its_epsilon_matches_independent_checks():
    cfg = parse_run_config({**BASE, "target-epsilon": 2.0, "participation-cap": 3})
    mechanism = privacy.site_mechanism(cfg)
    plan = mechanism.plan(cfg, None)
    assert plan.accountant == "rdp-int" and plan.examples is None  # no count is released
    state: dict = {}
    spent = []
    for rnd in (1, 4, 7):  # any three rounds: what counts is how many
        ledger = Ledger(lambda _: mechanism.plan(cfg, None), path=None, state=state,
                        server_round=rnd, terms=("rdp-int", 2.0, cfg.target_delta))
        with ledger.session():
            ledger.check()
            spent.append(ledger.spend())
            state = ledger.record()
    assert spent[-1] <= 2.0 and spent[0] < spent[1] < spent[2]
    ledger = Ledger(lambda _: mechanism.plan(cfg, None), path=None, state=state,
                    server_round=8, terms=("rdp-int", 2.0, cfg.target_delta))
    with ledger.session(), pytest.raises(BudgetExhausted):
        ledger.check()  # a fourth release would pass the target: refused
    # Independent checks on the release the sites really make (a LoRA-sized update).
    spec = update_spec({"b": np.zeros(74_498)})
    v = spec.variance(plan.noise_multiplier)
    direct = epsilon_of_rdp(spec.rdp(v) * 3, INTEGER_ORDERS, cfg.target_delta)
    ledger_eps = epsilon_of_history([(plan.noise_multiplier, 1.0, 3)], delta=cfg.target_delta,
                                    accountant="rdp-int")
    assert ledger_eps * 0.99 <= direct <= ledger_eps * (1 + 1e-9)
    google = epsilon_dp_accounting(noise_multiplier=math.sqrt(v) / spec.l2_sensitivity,
                                   sample_rate=1.0, steps=3, delta=cfg.target_delta,
                                   orders=INTEGER_ORDERS)
    assert google <= direct <= google * 1.01


def _audit(noise_cut: float, claim: float, m: int = 1000, t: int = 4) -> float:
    """One release with m canary sites (each a one-hot update far beyond the clip, in with
    probability 1/2), t honest sites adding their shares through the real code path; the
    attacker scores each canary by its coordinate of the revealed sum."""
    cfg = parse_run_config({**BASE, "dp-min-honest": float(t), "participation-cap": 1,
                            "target-epsilon": claim})
    payload = {"b": np.zeros(m)}
    release = distributed_dp.release_for(cfg, payload, 1)
    included = np.random.default_rng().random(m) < 0.5
    total = np.zeros(release.spec.length, np.int64)
    for i in np.flatnonzero(included):
        trained = np.zeros(m)
        trained[i] = 50.0
        total += update_vector({"b": trained}, payload, clip=release.clip)
    for _ in range(t):
        total += distributed_dp.noised(np.zeros(release.spec.length, np.int64),
                                       sigma=release.sigma * noise_cut, cohort=t, cfg=cfg,
                                       spec=release.spec)
    sizes = [(50, 50), (100, 100), (200, 200), (m // 2, m // 2)]
    return audit.audit_guesses(total[:-1].astype(np.float64), included, sizes=sizes,
                               delta=1e-5).epsilon_lower_bound


def test_a_canary_audit_stays_under_the_claim_and_flags_a_tenfold_noise_cut():
    claim = 2.0
    honest = [_audit(1.0, claim) for _ in range(3)]
    assert max(honest) <= claim, honest
    assert _audit(0.1, claim) > claim


def test_a_site_policy_must_accept_the_mode_and_its_epsilon_cap_holds():
    cfg = parse_run_config({**BASE, "target-epsilon": 8.0})
    sim = {"partition-id": 0}
    with pytest.raises(PolicyRefusal, match="distributed-client"):
        SitePolicy.from_node_config({**sim, "accept-dp-modes": "client"}).check_run(cfg)
    with pytest.raises(PolicyRefusal, match="max-epsilon"):
        SitePolicy.from_node_config({**sim, "accept-dp-modes": "distributed-client",
                                     "max-epsilon": 4.0}).check_run(cfg)
    SitePolicy.from_node_config({**sim, "accept-dp-modes": "distributed-client",
                                 "max-epsilon": 8.0}).check_run(cfg)
    with pytest.raises(PolicyRefusal, match="min-noise-share"):  # a deployed site
        SitePolicy.from_node_config({"accept-dp-modes": "distributed-client", "max-epsilon": 8.0,
                                     "max-delta": 1e-5, "secagg-identity": "x",
                                     "secagg-peers": "y"}).check_run(cfg)
    with pytest.raises(PolicyRefusal, match="'max-delta'"):  # its own, not the server's
        SitePolicy.from_node_config({"accept-dp-modes": "distributed-client", "max-epsilon": 8.0,
                                     "min-noise-share": 0.1, "min-reply-seconds": 60,
                                     "secagg-identity": "x", "secagg-peers": "y"}).check_run(cfg)


# -- rounds in a Flower simulation ------------------------------------------------------------
@pytest.mark.slow
def test_rounds_sum_clipped_noised_updates_and_no_site_passes_its_cap(custom_task,
                                                                       monkeypatch):
    revealed, cohorts = [], []
    aggregate, capped = SecAggServer.aggregate, SecureAggregationStrategy._capped_cohort

    def spy_sum(self, replies):
        total = aggregate(self, replies)
        revealed.append((self.config.round_id, total.survivors, total.signed()))
        return total

    def spy_cohort(self, grid, server_round):
        nodes = capped(self, grid, server_round)
        cohorts.append(nodes)
        return nodes

    monkeypatch.setattr(SecAggServer, "aggregate", spy_sum)
    monkeypatch.setattr(SecureAggregationStrategy, "_capped_cohort", spy_cohort)
    overrides = {**custom_task, **BASE, "num-server-rounds": 2, "fraction-train": 0.5,
                 "fraction-evaluate": 0.0, "participation-cap": 1, "target-epsilon": 8.0,
                 "target-delta": 1e-3, "dp-min-honest": 1.0, "num-partitions": 6,
                 "run-name": "dul"}
    run_dir = run_in_process(overrides, num_nodes=6)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["clients_sampled"] for r in rounds[1:]] == [3, 3]
    assert len(cohorts) == 2 and not set(cohorts[0]) & set(cohorts[1])  # cap 1: six sites
    assert [len(s) for _, s, _ in revealed] == [3, 3]
    cfg = parse_run_config(overrides)
    sigma = DistributedUserLevel().sigma(cfg)
    for _, _, total in revealed:  # t = the whole cohort (1.0): each of 3 sites adds v / 3
        spec = update_spec({"x": np.zeros(total.shape[0] - 1)})
        ratio = total.astype(np.float64).var() / spec.variance(sigma)
        assert 0.85 < ratio < 1.15, ratio  # the clipped updates are far below the noise
    assert json.loads((run_dir / "comms.json").read_text())["measured_equals_analytic"]
    with open(run_dir / "privacy.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["steps"] for r in rows} == {"1"}  # one release per site
    assert all(0 < float(r["epsilon"]) <= 8.0 for r in rows)


def test_a_server_that_calls_honest_sites_dropped_cannot_short_the_noise():
    """The server decides who is missing from a sum. With c colluders in a cohort of n and t
    honest assumed, a sum of t sites could hold only t - c honest shares; so a site reveals
    nothing for a sum of fewer than n - d sites and adds v / (t - d): every missing site
    counted as an honest one, the sum still holds v."""
    from flwr.app import Context, RecordDict

    from fedlora.app.client.secure_aggregation import check_contributors
    from fedlora.secagg import ProtocolError, RoundConfig, SecAggClient

    config = RoundConfig.create(2, range(1, 7), length=3, bits=40)  # a cohort of 6
    client = SecAggClient(1)
    client.setup(config.to_message())

    def context(**keys):
        return Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                       state=RecordDict(), run_config={**BASE, "dp-min-honest": 4.0,
                                                       "num-server-rounds": 2, **keys})

    with pytest.raises(ProtocolError, match="fewer than 6"):  # one honest site "dropped"
        check_contributors({"u3": [1, 2, 3, 4, 5]}, client, context())
    check_contributors({"u3": list(range(1, 7))}, client, context())
    one = context(**{"dp-max-dropouts": 1.0})
    check_contributors({"u3": [1, 2, 3, 4, 5]}, client, one)
    with pytest.raises(ProtocolError, match="fewer than 5"):
        check_contributors({"u3": [1, 2, 3, 4]}, client, one)
    # ... and with one dropout allowed, each site adds v / (4 - 1): three honest shares of
    # the sum's five are enough.
    cfg = parse_run_config(dict(one.run_config))
    assert distributed_dp.share_divisor(cfg, 6) == 3
    spec = update_spec({"b": np.zeros(20_000)})
    share = distributed_dp.noised(np.zeros(spec.length, np.int64), sigma=1.0, cohort=6,
                                  cfg=cfg, spec=spec).astype(np.float64)
    assert abs(share.var() / (spec.variance(1.0) / 3) - 1) < 5 * math.sqrt(2 / spec.length)
    with pytest.raises(ValueError, match="no honest site"):
        distributed_dp.share_divisor(parse_run_config({**BASE, "dp-min-honest": 2.0,
                                                       "dp-max-dropouts": 2.0}), 6)
