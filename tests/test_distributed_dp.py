"""Distributed DP on the secure sum (``dp-mode = "sample"`` with ``secure-aggregation``):
the Skellam mechanism's bound, its shares, its accounting, an attacker's audit, and rounds
in a real Flower simulation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from fedlora import distributed_dp
from fedlora.config import ConfigError
from fedlora.privacy import audit
from fedlora.privacy.accounting import (
    calibrate_noise_multiplier,
    epsilon_dp_accounting,
    epsilon_of_history,
)
from fedlora.privacy.count import COUNT_NOISE_STD, count_history
from fedlora.privacy.skellam import (
    INTEGER_ORDERS,
    SkellamSum,
    epsilon_of_rdp,
    skellam_share,
)
from fedlora.runtime import parse_run_config
from fedlora.secagg import SecAggServer

from .test_simulation import run_in_process


def _exact_rdp_1d(alpha: int, variance: float, shift: int) -> float:
    """D_alpha(Sk + shift || Sk) of a symmetric Skellam of ``variance``, by summing the pmf."""
    mu = variance / 2
    sd = math.sqrt(variance)
    k = np.arange(-int(60 * sd) - abs(shift) - 50, int(60 * sd) + abs(shift) + 50)
    log_p = stats.skellam.logpmf(k - shift, mu, mu)
    log_q = stats.skellam.logpmf(k, mu, mu)
    with np.errstate(invalid="ignore"):
        terms = alpha * log_p + (1 - alpha) * log_q
    return float(np.logaddexp.reduce(terms[np.isfinite(terms)]) / (alpha - 1))


@pytest.mark.parametrize("variance", [50.0, 400.0])
def test_the_skellam_bound_holds_and_is_tight_against_the_exact_divergence(variance):
    # A spread shift (ones on Delta_2^2 coordinates) and a concentrated one (one coordinate).
    spec = SkellamSum(dims=16, units=3, count_weight=1)  # tiny, so exact sums are cheap
    for alpha in (2, 5, 16):
        for shifts in ([1] * 9, [3]):
            d2sq = sum(s * s for s in shifts)
            exact = sum(_exact_rdp_1d(alpha, variance, s) for s in shifts)
            gaussian = alpha * d2sq / (2 * variance)
            bound = (alpha * d2sq / (2 * variance) + min(
                ((2 * alpha - 1) * d2sq + 6 * sum(shifts)) / (4 * variance ** 2),
                3 * sum(shifts) / (2 * variance)))
            assert exact <= bound * (1 + 1e-9), (alpha, shifts, exact, bound)
            assert bound <= gaussian * 1.05  # the bound is close to the Gaussian's
    # The mechanism's own bound uses its worst-case sensitivities and dominates the Gaussian
    # equivalent the ledger records, at every integer order.
    v = 1e6
    sigma = spec.gaussian_equivalent(v)
    gaussian = np.asarray(INTEGER_ORDERS) / (2 * sigma ** 2)
    assert np.all(spec.rdp(v) <= gaussian * (1 + 1e-12))
    assert spec.variance(sigma) == pytest.approx(v, rel=1e-9)


def test_one_example_moves_the_sum_by_at_most_the_stated_sensitivity():
    spec = SkellamSum.for_dims(40)
    rng = np.random.default_rng(0)
    worst_l2 = worst_l1 = 0.0
    for scale in (1e-3, 0.5, 1.0, 1e6):  # inside the clip, at it, far outside
        for _ in range(200):
            g = rng.standard_normal((1, 40)) * scale
            g[0, : rng.integers(1, 40)] = scale  # many equal coordinates: worst rounding
            v = spec.encode(g, clip=0.7).astype(np.float64)
            worst_l2 = max(worst_l2, float(np.linalg.norm(v)))
            worst_l1 = max(worst_l1, float(np.abs(v).sum()))
    assert worst_l2 <= spec.l2_sensitivity and worst_l1 <= spec.l1_sensitivity
    assert worst_l2 > 0.95 * math.hypot(spec.units, spec.count_weight)  # the bound is used
    # The rounding is unbiased: the mean of many encodings is the scaled, clipped gradient.
    g = np.full((1, 40), 0.01)
    mean = np.mean([spec.encode(g, clip=1.0)[:-1] for _ in range(4000)], axis=0)
    assert np.allclose(mean, 0.01 * spec.units, atol=0.05)


def test_shares_sum_to_the_planned_variance_from_os_entropy():
    variance, t, length = 1.0e6, 5, 20_000
    np.random.seed(0)
    first = skellam_share(variance, t, length)
    np.random.seed(0)
    second = skellam_share(variance, t, length)
    assert not np.array_equal(first, second)  # not from the seedable global generator
    total = sum(skellam_share(variance, t, length) for _ in range(t))
    # Variance of the sum of t shares: v (sd of a sample variance ~ v sqrt(2/n)).
    assert abs(total.var() / variance - 1) < 5 * math.sqrt(2 / length)
    assert abs(first.var() / (variance / t) - 1) < 5 * math.sqrt(2 / length)
    assert abs(total.mean()) < 5 * math.sqrt(variance / length)


def test_the_ledgers_epsilon_matches_the_direct_skellam_and_an_independent_gaussian():
    cfg = parse_run_config({"dp-mode": "sample", "secure-aggregation": True,
                            "target-epsilon": 1.0})
    mechanism = __import__("fedlora.privacy", fromlist=["x"]).client_mechanism("sample")
    plan = mechanism.plan(cfg, 500)
    assert plan.accountant == "rdp-int" and plan.probe_steps == 1
    assert plan.probe_rounds == cfg.num_server_rounds == 30
    history = [*count_history(COUNT_NOISE_STD), (plan.noise_multiplier, 1.0, 30)]
    ledger_eps = epsilon_of_history(history, delta=cfg.target_delta, accountant="rdp-int")
    assert ledger_eps <= 1.0
    # Direct: the Skellam bound of the released vectors (the head of the default task: 385
    # entries x 2 labels) at the variance the sites add, composed with the count's release.
    spec = SkellamSum.for_dims(770)
    variance = spec.variance(plan.noise_multiplier)
    count_rdp = np.asarray(INTEGER_ORDERS) / (2 * COUNT_NOISE_STD ** 2)
    direct = epsilon_of_rdp(spec.rdp(variance) * 30 + count_rdp, INTEGER_ORDERS,
                            cfg.target_delta)
    assert direct <= ledger_eps * (1 + 1e-9) and direct >= ledger_eps * 0.99
    # Independent (Google's dp_accounting): a Gaussian of the same variance on the same
    # sensitivity can only be more private; the Skellam run is within 1 % of it.
    sigma_exact = math.sqrt(variance) / spec.l2_sensitivity
    google = epsilon_dp_accounting(noise_multiplier=sigma_exact, sample_rate=1.0, steps=30,
                                   delta=cfg.target_delta, orders=INTEGER_ORDERS)
    only_steps = epsilon_of_rdp(spec.rdp(variance) * 30, INTEGER_ORDERS, cfg.target_delta)
    assert google <= only_steps <= google * 1.01


def _audit(noise_cut: float, claim: float, m: int = 1000, sites: int = 4) -> float:
    """One release of the distributed sum with m canaries (one-hot gradients, each in with
    probability 1/2, spread over the sites), each site adding its share through the real
    code path; the attacker scores each canary by its coordinate of the released sum."""
    sigma = calibrate_noise_multiplier(target_epsilon=claim, target_delta=1e-5,
                                       sample_rate=1.0, steps=1, accountant="rdp-int")
    spec = SkellamSum.for_dims(m)
    rng = np.random.default_rng()
    included = rng.random(m) < 0.5
    total = np.zeros(spec.length, dtype=np.int64)
    owner = rng.integers(0, sites, m)
    cfg = parse_run_config({"dp-mode": "sample", "secure-aggregation": True,
                            "dp-min-honest": float(sites)})
    payload = {"base_model.model.classifier.weight": np.zeros((1, m))}
    for s in range(sites):
        rows = np.flatnonzero(included & (owner == s))
        grads = np.zeros((len(rows), m))
        grads[np.arange(len(rows)), rows] = 5.0  # clipped to 1
        vector = spec.encode(grads, clip=1.0)
        total += distributed_dp.noised(vector, sigma=sigma * noise_cut, cohort=sites, cfg=cfg,
                                       spec=distributed_dp.spec_for(payload))
    scores = total[:-1].astype(np.float64)
    sizes = [(50, 50), (100, 100), (200, 200), (m // 2, m // 2)]
    return audit.audit_guesses(scores, included, sizes=sizes, delta=1e-5).epsilon_lower_bound


def test_a_canary_audit_stays_under_the_claim_and_flags_a_tenfold_noise_cut():
    claim = 2.0
    honest = [_audit(1.0, claim) for _ in range(3)]
    assert max(honest) <= claim, honest
    assert _audit(0.1, claim) > claim  # a mechanism with a tenth of its noise is caught


# -- rounds in a Flower simulation ------------------------------------------------------------
def test_distributed_lora_rounds_are_full_batch_steps_of_every_sent_tensor_and_prv_is_refused():
    base = {"dp-mode": "sample", "secure-aggregation": True}
    cfg = parse_run_config({**base, "num-server-rounds": 4, "probe-rounds": 2})
    payload = {"m.lora_A.weight": np.zeros((2, 5)), "m.lora_B.weight": np.zeros((3, 2)),
               "classifier.weight": np.zeros((2, 3))}
    kinds = [distributed_dp.release_for(cfg, payload, r) for r in (1, 2, 3, 4)]
    assert [k.kind for k in kinds] == ["head-step"] * 2 + ["lora-step"] * 2
    assert kinds[0].spec.dims == 6 and kinds[2].spec.dims == 22
    assert kinds[2].keys == tuple(sorted(payload))
    # Every site's plan: four full-batch steps at one sigma, the one the server assumes.
    mechanism = __import__("fedlora.privacy", fromlist=["x"]).client_mechanism("sample")
    plan = mechanism.plan(cfg, 300)
    assert [plan.cost(r) for r in (1, 3)] == [(1.0, 1), (1.0, 1)]
    assert plan.noise_multiplier == kinds[3].sigma == mechanism.distributed_sigma(cfg)
    with pytest.raises(ConfigError, match="accountant"):
        parse_run_config({**base, "accountant": "prv"})
    with pytest.raises(ConfigError, match="dp-min-honest"):
        parse_run_config({**base, "dp-min-honest": 2.5})


@pytest.fixture()
def revealed(monkeypatch):
    seen: list = []
    aggregate = SecAggServer.aggregate

    def spy(self, replies):
        total = aggregate(self, replies)
        seen.append((self.config.round_id, total.survivors, total.signed()))
        return total

    monkeypatch.setattr(SecAggServer, "aggregate", spy)
    return seen


def _run(custom_task, num_nodes=4, **extra):
    overrides = {**custom_task, "num-server-rounds": 2, "fraction-train": 1.0,
                 "fraction-evaluate": 0.0, "secure-aggregation": True, "dp-mode": "sample",
                 "target-epsilon": 4.0, "run-name": "ddp", **extra}
    return run_in_process(overrides, num_nodes=num_nodes)


@pytest.mark.slow
def test_a_distributed_round_releases_one_noised_step_of_the_head(custom_task, revealed):
    run_dir = _run(custom_task, **{"dp-min-honest": 1.0})
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["clients_accepted"] for r in rounds[1:]] == [4, 4]
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["probe-rounds"] == 2
    assert len(revealed) == 2
    for _, survivors, total in revealed:
        spec_len = total.shape[0]
        _, count = SkellamSum.for_dims(spec_len - 1).decode(total, 1.0)
        # 200 examples over the 4 sites, seen through noise of std ~ sigma * Delta / weight
        assert len(survivors) == 4 and 100 < count < 300, count
    # The round context (a digest of the DP parameters) in the setup: still its formula.
    assert json.loads((run_dir / "comms.json").read_text())["measured_equals_analytic"]


@pytest.mark.slow
def test_a_round_with_fewer_contributors_than_dp_min_honest_releases_nothing(
        custom_task, revealed):
    # seed 2, dropout 0.3 with 5 sites: one site fails in round 1 (see test_secure_aggregation)
    run_dir = _run(custom_task, **{"dp-min-honest": 5.0, "seed": 2, "dropout-fraction": 0.3,
                                   "num-partitions": 5}, num_nodes=5)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert rounds[1]["clients_accepted"] == 0 and "released nothing" in rounds[1]["note"]
    assert "dp-min-honest" in rounds[1]["note"]
    assert not [r for r in revealed if r[0] == 1]




def test_huge_noise_keeps_its_low_bits_and_a_share_beyond_exact_draws_is_refused():
    """numpy's Poisson sampler works in doubles: at rate 2^53 every draw is even, and a sum of
    such shares would show the data's low bits. Shares are drawn in pieces it samples exactly,
    and a share whose rate passes the cap is refused (before any site trains)."""
    from fedlora.privacy.skellam import MAX_SHARE_RATE, check_share

    variance = 2 * MAX_SHARE_RATE  # a share at the cap: 256 pieces of 2^30
    draws = skellam_share(variance, 1, 40_000)
    counts = np.bincount((draws % 64).astype(np.int64), minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-4  # the low bits are uniform
    assert abs(draws.astype(np.float64).var() / variance - 1) < 5 * math.sqrt(2 / 40_000)
    with pytest.raises(ValueError, match="drawn accurately"):
        check_share(2 ** 59, 1)  # what a server asking for sigma 131072 on the head gets
    with pytest.raises(ValueError, match="drawn accurately"):
        skellam_share(2 ** 59, 1, 10)
    check_share(2 ** 59, 2 ** 20)  # the same noise split over enough honest sites is fine
