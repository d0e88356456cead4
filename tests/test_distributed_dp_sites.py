"""Distributed DP at a site: its opt-in and noise floor, the publicly bounded sum, the
whole noise path, and the rounds it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora import distributed_dp, distributed_grads
from fedlora.privacy.skellam import SkellamSum
from fedlora.runtime import parse_run_config


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
    with pytest.raises(PolicyRefusal, match="'max-epsilon' and 'max-delta'"):  # its budget
        SitePolicy.from_node_config({"accept-dp-modes": "distributed", "min-noise-share": 0.1,
                                     "min-reply-seconds": 60}).check_run(cfg)
    deployed = {"accept-dp-modes": "distributed", "max-epsilon": 8.0, "max-delta": 1e-5}
    with pytest.raises(PolicyRefusal, match="'min-noise-share' and 'min-reply-seconds'"):
        SitePolicy.from_node_config(deployed).check_run(cfg)
    with pytest.raises(PolicyRefusal, match="'min-noise-share'"):  # pinning is not enough
        SitePolicy.from_node_config({**deployed, "secagg-peers": "/etc/peers",
                                     "min-reply-seconds": 60}).check_run(cfg)
    with pytest.raises(PolicyRefusal, match="'secagg-identity' and 'secagg-peers'"):
        SitePolicy.from_node_config({**deployed, "min-noise-share": 0.1,
                                     "min-reply-seconds": 60}).check_run(cfg)
    SitePolicy.from_node_config({**deployed, "min-noise-share": 0.1, "min-reply-seconds": 60,
                                 "secagg-identity": "/etc/key",
                                 "secagg-peers": "/etc/peers"}).check_run(cfg)
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
                                    cfg=cfg, spec=distributed_dp.spec_for(payload), bits=12)
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
    grads = distributed_grads.per_example_grads(head, feats, labels, ["weight", "bias"])
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
                                  cfg=cfg, spec=spec).astype(np.float64)
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
                                           cohort=10, cfg=cfg, spec=spec)))
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
        release = distributed_dp.Release("head-step", spec, sigma, cfg.max_grad_norm,
                                         cfg.max_num_examples, ("classifier.weight",))
        contexts[eps] = distributed_dp.round_context(cfg, release, 3)
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

    from fedlora import distributed_grads as ddp

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
    spec = distributed_dp.spec_for(payload)
    monkeypatch.setattr(ddp, "features", lambda model, data, idx, bs: feats[idx])
    without_bad = ddp.site_vector(None, Data(), np.delete(np.arange(150), bad), cfg=cfg,
                                  payload=payload, spec=spec)
    monkeypatch.setattr(ddp, "features", features)
    with_bad = ddp.site_vector(None, Data(), np.arange(150), cfg=cfg, payload=payload,
                               spec=spec)
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

    release = distributed_dp.release_for(cfg, _own_payload(cfg, context()), 1)
    spec = release.spec
    _, threshold = resolve_graph(cfg, 3)
    bits = distributed_dp.round_bits(cfg, release, 3)

    def setup(length=spec.length, ctx_bytes=None):
        digest = distributed_dp.round_context(cfg, release, 3) if ctx_bytes is None \
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
        other_cfg, distributed_dp.release_for(other_cfg, _own_payload(cfg, context()), 1), 3)
    assert "run-config" in setup(ctx_bytes=other)["reason"]
    assert "entries" in setup(length=spec.length + 1)["reason"]
