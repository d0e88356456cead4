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
                                       payload=payload)
    scores = total[:-1].astype(np.float64)
    sizes = [(50, 50), (100, 100), (200, 200), (m // 2, m // 2)]
    return audit.audit_guesses(scores, included, sizes=sizes, delta=1e-5).epsilon_lower_bound


def test_a_canary_audit_stays_under_the_claim_and_flags_a_tenfold_noise_cut():
    claim = 2.0
    honest = [_audit(1.0, claim) for _ in range(3)]
    assert max(honest) <= claim, honest
    assert _audit(0.1, claim) > claim  # a mechanism with a tenth of its noise is caught


# -- rounds in a Flower simulation ------------------------------------------------------------
def test_distributed_runs_refuse_lora_rounds_and_prv():
    base = {"dp-mode": "sample", "secure-aggregation": True}
    with pytest.raises(ConfigError, match="probe-rounds"):
        parse_run_config({**base, "num-server-rounds": 4, "probe-rounds": 2})
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


def test_a_site_opts_in_to_distributed_dp_and_floors_its_noise_share():
    from fedlora.privacy.site_policy import PolicyRefusal, SitePolicy

    cfg = parse_run_config({"dp-mode": "sample", "secure-aggregation": True})
    local_only = SitePolicy.from_node_config({"accept-dp-modes": "sample", "max-epsilon": 8.0,
                                              "partition-id": 0})
    with pytest.raises(PolicyRefusal, match="'distributed'"):
        local_only.check_run(cfg)  # its own DP-SGD noise is what 'sample' promised it
    local_only.check_run(parse_run_config({"dp-mode": "sample"}))
    site = SitePolicy.from_node_config({"accept-dp-modes": "distributed", "max-epsilon": 8.0,
                                        "min-noise-share": 0.25, "min-noise-multiplier": 2.0,
                                        "partition-id": 0})
    site.check_run(cfg)
    site.check_noise_share(4, 2.0)  # its own share's noise multiplier (a Gaussian equivalent)
    with pytest.raises(PolicyRefusal, match="min-noise-share"):
        site.check_noise_share(5, 2.0)  # a fifth of the noise: more honest sites than it trusts
    with pytest.raises(PolicyRefusal, match="min-noise-multiplier"):
        site.check_noise_share(4, 1.99)
    # A deployed site bounds whom it trusts, else the server's cohort would decide its share,
    # and hides its compute time, which grows with its data.
    deployed = {"accept-dp-modes": "distributed", "max-epsilon": 8.0}
    with pytest.raises(PolicyRefusal, match="'min-noise-share' and 'min-reply-seconds'"):
        SitePolicy.from_node_config(deployed).check_run(cfg)
    with pytest.raises(PolicyRefusal, match="'min-noise-share'"):  # pinning is not enough
        SitePolicy.from_node_config({**deployed, "secagg-peers": "/etc/peers",
                                     "min-reply-seconds": 60}).check_run(cfg)
    SitePolicy.from_node_config({**deployed, "min-noise-share": 0.1,
                                 "min-reply-seconds": 60}).check_run(cfg)
    with pytest.raises(PolicyRefusal, match="min-noise-share"):
        SitePolicy.from_node_config({"accept-dp-modes": "distributed", "min-noise-share": 1.5})


def test_a_sites_sum_is_bounded_publicly_and_its_noise_wraps_instead_of_failing():
    spec = SkellamSum.for_dims(6)
    big = spec.encode(np.ones((50, 6)), clip=1.0)
    bounded = spec.bound_sum(big, max_examples=10)  # a site larger than the public bound
    assert np.abs(bounded[:-1]).max() <= 10 * (spec.units + 1)
    assert bounded[-1] == 10 * spec.count_weight
    # Clipping coordinates keeps neighbours within the sensitivity: one example more or less
    one_less = spec.bound_sum(spec.encode(np.ones((49, 6)), clip=1.0), max_examples=10)
    assert np.linalg.norm((bounded - one_less).astype(float)) <= spec.l2_sensitivity
    cfg = parse_run_config({"dp-mode": "sample", "secure-aggregation": True})
    payload = {"base_model.model.classifier.weight": np.zeros((2, 3))}
    wrapped = distributed_dp.noised(np.full(7, 2**11, np.int64), sigma=1e-3, cohort=4,
                                    cfg=cfg, payload=payload, bits=12)
    assert wrapped.min() >= -(2**11) and wrapped.max() < 2**11  # no refusal, a wrapped value


def test_a_head_crafted_to_overflow_on_some_inputs_gets_no_refusal():
    """A server that sends a head whose logits overflow for examples with a feature above a
    threshold must not learn, from a refusal, whether the site holds such an example."""
    import torch
    from torch import nn

    head = nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[0, 0] = 3e38
        head.bias[0] = 3e38
    feats = torch.tensor([[-1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([1, 1, 0])
    grads = distributed_dp.per_example_grads(head, feats, labels, ["weight", "bias"])
    assert np.isfinite(grads).all()
    # The example below the threshold keeps its own gradient; the overflowing ones add none.
    x = feats[0].clone()
    head.zero_grad()
    nn.functional.cross_entropy(head(x[None]), labels[:1]).backward()
    reference = torch.cat([head.weight.grad.ravel(), head.bias.grad]).double().numpy()
    assert np.allclose(grads[0], reference) and not np.any(grads[1:])
    spec = SkellamSum.for_dims(8)
    vector = spec.encode(grads, clip=1.0)  # encodes, counting every example
    assert vector[-1] == 3 * spec.count_weight


def test_the_whole_noise_path_adds_v_over_t_per_site_whatever_the_cohort():
    cfg = parse_run_config({"dp-mode": "sample", "secure-aggregation": True,
                            "dp-min-honest": 5.0})
    payload = {"base_model.model.classifier.weight": np.zeros((100, 100))}
    spec = distributed_dp.spec_for(payload)
    draws = distributed_dp.noised(np.zeros(spec.length, np.int64), sigma=2.0, cohort=10,
                                  cfg=cfg, payload=payload).astype(np.float64)
    expected = spec.variance(2.0) / 5  # t = 5 of a cohort of 10: a fifth of v each
    assert abs(draws.var() / expected - 1) < 5 * math.sqrt(2 / spec.length)
    # Neither the numpy nor the torch global seed, nor the run's seed, fixes the coins.
    import torch

    g = np.random.default_rng(1).random((3, 10_000)) * 1e-3  # fractional steps: coins matter
    outs = []
    for _ in range(2):
        np.random.seed(0)
        torch.manual_seed(0)
        outs.append((SkellamSum.for_dims(10_000).encode(g, clip=1.0),
                     distributed_dp.noised(np.zeros(spec.length, np.int64), sigma=2.0,
                                           cohort=10, cfg=cfg, payload=payload)))
    assert not np.array_equal(outs[0][0], outs[1][0])
    assert not np.array_equal(outs[0][1], outs[1][1])


def test_sites_given_other_dp_parameters_refuse_each_others_round():
    """The DP parameters are bound into the signed round config: a server that tells one
    site epsilon 1 and the others epsilon 100 gets no round."""
    from fedlora.secagg import ProtocolError, RoundAborted, RoundConfig, SecAggClient
    from fedlora.secagg.local import run_local_round

    spec = SkellamSum.for_dims(4)
    cohort = [1, 2, 3]
    contexts = {}
    for eps in (1.0, 100.0):
        cfg = parse_run_config({"dp-mode": "sample", "secure-aggregation": True,
                                "target-epsilon": eps})
        sigma = __import__("fedlora.privacy", fromlist=["x"]).client_mechanism(
            "sample").distributed_sigma(cfg)
        contexts[eps] = distributed_dp.round_context(cfg, spec, 3, sigma)
    assert contexts[1.0] != contexts[100.0]
    base = RoundConfig.create(1, cohort, length=5, bits=40, context=contexts[100.0])
    told_one = RoundConfig(base.round_id, base.cohort, base.degree, base.threshold, base.bits,
                           base.length, base.graph_seed, contexts[1.0])
    clients = {u: SecAggClient(u) for u in cohort}
    commitments = {u: clients[u].setup((told_one if u == 1 else base).to_message())
                   ["commitment"] for u in cohort}
    bundles = {u: clients[u].advertise({"commitments": commitments}) for u in cohort}
    seed_shares = {u: b["seed_share"] for u, b in bundles.items()}
    # Even a server that forwards everything: site 2 cannot open site 1's commitment to the
    # graph seed, made for another round config, and refuses the round (as site 1 refuses
    # the others').
    with pytest.raises(ProtocolError, match="node 1's reveal does not open"):
        clients[2].share_keys({"seed_shares": seed_shares,
                               "keys": {v: bundles[v] for v in (1, 3)}})
    with pytest.raises(ProtocolError, match="does not open"):
        clients[1].share_keys({"seed_shares": seed_shares,
                               "keys": {v: bundles[v] for v in (2, 3)}})
    with pytest.raises(RoundAborted):  # and the honest server's own check drops it
        run_local_round(base, {u: np.zeros(5, np.uint64) for u in cohort},
                        clients={u: SecAggClient(u) for u in cohort},
                        tamper=lambda st, m: {**m, 1: told_one.to_message()} if st == "setup"
                        else m)


def test_an_example_that_fails_adds_no_gradient_but_counts_and_no_other_is_lost(monkeypatch):
    """Whatever fails while a site takes its gradients (memory, say, on one long example), it
    answers, and its answer differs from a clean one by at most that example's gradient."""
    import torch
    from torch import nn

    from fedlora import distributed_dp as ddp

    head = nn.Linear(4, 2)
    feats = torch.randn(150, 4)

    class Data:
        labels = torch.randint(0, 2, (150,))

    bad = 100  # the example whose presence makes what it is computed with fail
    real = ddp.features

    def features(model, data, idx, bs):
        if bad in set(np.asarray(idx).tolist()):
            raise torch.OutOfMemoryError("out of memory")
        return feats[idx]

    monkeypatch.setattr(ddp, "head_module", lambda model: head)
    payload = {"base_model.model.classifier.bias": np.zeros(2),
               "base_model.model.classifier.weight": np.zeros((2, 4))}
    cfg = parse_run_config({"dp-mode": "sample", "secure-aggregation": True})
    spec = ddp.spec_for(payload)
    monkeypatch.setattr(ddp, "features", lambda model, data, idx, bs: feats[idx])
    without_bad = ddp.site_vector(None, Data(), np.delete(np.arange(150), bad), cfg=cfg,
                                  payload=payload)
    monkeypatch.setattr(ddp, "features", features)
    with_bad = ddp.site_vector(None, Data(), np.arange(150), cfg=cfg, payload=payload)
    assert real is not features
    assert with_bad[-1] == 150 * spec.count_weight  # every example counts, the bad one too
    # Only rounding differs between the two (the other 149 gradients are all there): far
    # less than one example's sensitivity, let alone a chunk's.
    diff = (with_bad - without_bad).astype(np.float64)
    diff[-1] -= spec.count_weight
    assert np.linalg.norm(diff) <= spec.l2_sensitivity


def test_a_site_counts_only_pinned_neighbours_and_refuses_for_good(tmp_path):
    from flwr.app import Context, RecordDict

    from fedlora.app.client.secure_aggregation import check_contributors
    from fedlora.secagg import ProtocolError, RoundConfig, SecAggClient
    from fedlora.secagg.identity import generate, load_identity, load_peers

    keys = [tmp_path / f"k{i}" for i in range(2)]
    peers = tmp_path / "peers"
    peers.write_text("\n".join(generate(k) for k in keys))
    run_config = {"dp-mode": "sample", "secure-aggregation": True, "dp-min-honest": 4.0,
                  "num-server-rounds": 2}
    # 8 sites, 2 neighbours each: at most 3 pinned parties (itself and 2) can be counted.
    config = RoundConfig.create(1, range(1, 9), length=3, bits=40, degree=2)
    client = SecAggClient(1, identity=load_identity(keys[0]), trusted=load_peers(peers))
    client.setup(config.to_message())
    client.neighbours = frozenset({2, 8})  # as its key sharing leaves it: 2 neighbours
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                  run_config=run_config)
    with pytest.raises(ProtocolError, match="pinned"):
        check_contributors({"u3": list(range(1, 9))}, client, ctx)  # 8 in U3, 3 pinned
    with pytest.raises(ProtocolError, match="dp-min-honest"):  # ids outside the cohort
        check_contributors({"u3": [1, 2, 97, 98, 99]}, client, ctx)


def test_a_site_refuses_a_round_config_that_is_not_its_own_dp_parameters(
        custom_task, identity):
    """The site derives the round's digest, bits and length from its own run-config and
    model: a config stripped of its digest, carrying another's, or of another length is
    refused at setup, before any budget is spent."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedlora import privacy
    from fedlora.app.client.secure_aggregation import _own_payload, stage_fn
    from fedlora.protocol import CONFIG_KEY, STATUS_KEY
    from fedlora.secagg import RoundConfig
    from fedlora.secure_sum import message_type, resolve_graph, to_records

    run_config = {**custom_task, "dp-mode": "sample", "secure-aggregation": True,
                  "num-server-rounds": 2, "fraction-train": 1.0}
    cfg = parse_run_config(run_config)

    def context():
        return Context(run_id=1, node_id=7, node_config={"partition-id": 0},
                       state=RecordDict(), run_config=run_config)

    spec = distributed_dp.spec_for(_own_payload(cfg, context()))
    sigma = privacy.client_mechanism("sample").distributed_sigma(cfg)
    _, threshold = resolve_graph(cfg, 3)
    bits = distributed_dp.round_bits(cfg, spec, 3, sigma)

    def setup(length=spec.length, ctx_bytes=None):
        digest = distributed_dp.round_context(cfg, spec, 3, sigma) if ctx_bytes is None \
            else ctx_bytes
        config = RoundConfig.create(1, [7, 8, 9], length=length, bits=bits, degree="all",
                                    threshold=threshold, context=digest)
        msg = Message(RecordDict({**to_records(config.to_message()),
                                  CONFIG_KEY: ConfigRecord({"server-round": 1})}),
                      dst_node_id=7, message_type=message_type("setup"))
        return dict(stage_fn("setup", msg, context()).content[STATUS_KEY])

    assert setup()["status"] == "ok"
    stripped = setup(ctx_bytes=b"")
    assert stripped["status"] != "ok" and "run-config" in stripped["reason"]
    other_cfg = parse_run_config({**run_config, "target-epsilon": 100.0})
    other = distributed_dp.round_context(
        other_cfg, spec, 3, privacy.client_mechanism("sample").distributed_sigma(other_cfg))
    assert "run-config" in setup(ctx_bytes=other)["reason"]
    assert "entries" in setup(length=spec.length + 1)["reason"]
