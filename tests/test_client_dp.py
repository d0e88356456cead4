"""User-level DP at the server (dp-mode = client): clipping, noise, accountant, configs, a run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedlora import privacy
from fedlora.aggregation import get_method
from fedlora.config import ConfigError
from fedlora.privacy import CentralDp
from fedlora.privacy import user_level as central_dp
from fedlora.runtime import parse_run_config

from .test_simulation import run_in_process

MOD = "base_model.model.enc.query"
HEAD = "base_model.model.classifier.modules_to_save.default.weight"


def _global(rank: int = 4, d: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {MOD + ".lora_A.weight": rng.normal(size=(rank, d)).astype(np.float32),
            MOD + ".lora_B.weight": rng.normal(size=(d, rank)).astype(np.float32),
            HEAD: rng.normal(size=(2, d)).astype(np.float32)}


def _reply(global_state, scale: float, seed: int, keys=None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.normal(size=v.shape)).astype(np.float32)
            for k, v in global_state.items() if keys is None or k in keys}


def _central(*, sigma=1.0, clip=1.0, q=0.2, clients=10, rounds=5, eps=8.0, delta=1e-5,
             accountant="rdp", check_budget=True) -> CentralDp:
    out = CentralDp(noise_multiplier=sigma, clip=clip, sample_rate=q, target_epsilon=eps,
                    delta=delta, accountant=accountant, num_rounds=rounds)
    if check_budget:
        out.start_round(1, num_nodes=clients)
    else:  # a noise multiplier this small would (rightly) exceed any budget
        out.population, out.denominator = clients, q * clients
    return out


def _diff_norm(a, b) -> float:
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a))


def test_clipping_bounds_an_adversarial_clients_effect():
    g, method = _global(), get_method("fedavg", alpha=8.0, rank=4)
    honest = [_reply(g, 1e-3, s) for s in (1, 2)]
    attacker = {k: (v + 1e6).astype(np.float32) for k, v in g.items()}
    clip, w = 0.5, 2.0  # q = 0.2 of 10 clients
    # The test fixes the noise (rng) to compare the two releases; runs draw it from OS entropy.
    with_attack = _central(clip=clip).release(3, g, honest + [attacker], method,
                                              rng=np.random.default_rng(5))
    without = _central(clip=clip).release(3, g, honest, method, rng=np.random.default_rng(5))
    assert _diff_norm(attacker, g) > 1e6  # the attacker's update was huge ...
    assert _diff_norm(with_attack, without) <= clip / w * (1 + 1e-4)  # ... its effect is not
    assert _diff_norm(with_attack, without) > 0.9 * clip / w


def test_clipping_and_noise_scale_match_flowers_fixed_clipping():
    from flwr.supercore.differential_privacy import (
        compute_clip_model_update,
        compute_stdv,
    )

    g = _global()
    reply = _reply(g, 0.5, 7)
    keys = list(g)
    ours = central_dp.clip_and_sum([{k: reply[k].astype(np.float64) - g[k] for k in keys}],
                                          g, clip=0.3)
    flower = [reply[k].astype(np.float64) for k in keys]
    compute_clip_model_update(param1=flower, param2=[g[k].astype(np.float64) for k in keys],
                              clipping_norm=0.3)
    assert _diff_norm(reply, g) > 0.3
    for k, f in zip(keys, flower):  # ours may shrink by ~1e-6 more to stay strictly <= C
        np.testing.assert_allclose(g[k] + ours[k], f, rtol=1e-5, atol=1e-6)
    assert central_dp.noise_std(noise_multiplier=1.3, clip=0.3, denominator=4) == \
        pytest.approx(compute_stdv(1.3, 0.3, 4), rel=1e-15)


def test_server_noise_has_the_calibrated_std_and_is_never_drawn_twice():
    g = _global(rank=8, d=256)
    method = get_method("fedavg", alpha=16.0, rank=8)
    sigma, clip, q, n = 1.7, 0.8, 0.3, 10  # W = 3
    out = _central(sigma=sigma, clip=clip, q=q, clients=n).release(2, g, [], method)
    diff = np.concatenate([(out[k].astype(np.float64) - g[k]).ravel() for k in g])
    std = sigma * clip / (q * n)
    se = std / np.sqrt(2 * (diff.size - 1))
    assert abs(diff.std() - std) < 4 * se
    assert abs(diff.mean()) < 4 * std / np.sqrt(diff.size)
    # A resumed server releasing the same round again draws fresh noise: the difference of
    # two releases never reveals the difference of two sums.
    again = _central(sigma=sigma, clip=clip, q=q, clients=n).release(2, g, [], method)
    assert not any(np.array_equal(out[k], again[k]) for k in g)


@pytest.mark.parametrize("aggregator", ["fedavg", "ffa"])
def test_without_noise_and_clipping_the_release_is_the_uniform_mean(aggregator):
    g = _global()
    method = get_method(aggregator, alpha=8.0, rank=4)
    sent = method.payload(g)
    replies = [_reply(g, 0.1, s, keys=sent) for s in range(3)]
    expected = method.aggregate(replies, [1, 1, 1], g)  # uniform weights
    out = _central(sigma=1e-9, clip=100.0, q=1.0, clients=3,
                      check_budget=False).release(1, g, replies, method)
    for k in g:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-5)
    if aggregator == "ffa":  # A is frozen and never sent: no noise lands on it
        assert np.array_equal(out[MOD + ".lora_A.weight"], g[MOD + ".lora_A.weight"])


def test_poisson_sampling_has_rate_q():
    c = _central(q=0.3, clients=50)
    rng = np.random.default_rng(0)
    counts = [len(c.sample(list(range(50)), rng)) for _ in range(400)]
    assert len(set(counts)) > 5  # the sample size varies, as Poisson sampling does
    assert np.mean(counts) == pytest.approx(15, rel=0.05)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_run_ends_at_or_just_under_target_and_matches_independent_accounting(
        accountant):
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    cfg = parse_run_config({"dp-mode": "client", "num-server-rounds": 6, "fraction-train": 0.2,
                            "target-epsilon": 3.0, "target-delta": 1e-3,
                            "accountant": accountant})
    c = CentralDp.from_config(cfg)
    g, method = _global(), get_method("fedavg", alpha=8.0, rank=4)
    flower = RdpAccountant(PrivacyConfig(target_delta=1e-3, population_size=50,
                                         neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                         sampling_method=SamplingMethod.POISSON))
    eps = []
    for rnd in range(1, 7):
        c.start_round(rnd, num_nodes=50)
        g = c.release(rnd, g, [_reply(g, 0.01, rnd)], method)
        flower.compose(GaussianPrivacyEvent(noise_multiplier=c.noise_multiplier, sample_size=10,
                                            population_size=50))
        eps.append(c.metrics()["epsilon"])
    assert eps == sorted(eps) and eps[0] > 0
    assert 0.97 * 3.0 < eps[-1] <= 3.0
    if accountant == "rdp":  # two independent RDP implementations, Opacus' orders differ
        independent = privacy.epsilon_dp_accounting(noise_multiplier=c.noise_multiplier,
                                                    sample_rate=0.2, steps=6, delta=1e-3)
        assert eps[-1] == pytest.approx(independent, rel=0.01)
        assert eps[-1] == pytest.approx(flower.get_epsilon(1e-3), rel=0.01)
    else:  # PRV is tighter than RDP, never looser
        assert eps[-1] <= privacy.epsilon_dp_accounting(
            noise_multiplier=c.noise_multiplier, sample_rate=0.2, steps=6, delta=1e-3) * 1.01
    with pytest.raises(privacy.BudgetExhausted, match="user-level privacy budget exhausted"):
        c.start_round(7, num_nodes=50)


def test_state_dict_restores_the_spent_budget():
    c = _central(sigma=1.2, q=0.2, clients=20, eps=8.0)
    g, method = _global(), get_method("fedavg", alpha=8.0, rank=4)
    for rnd in (1, 2, 3):
        c.start_round(rnd, num_nodes=20)
        c.release(rnd, g, [], method)
    state = json.loads(json.dumps(c.state_dict()))  # as a checkpoint stores it
    fresh = CentralDp(noise_multiplier=1.2, clip=1.0, sample_rate=0.2, target_epsilon=8.0,
                      delta=1e-5, num_rounds=5)
    fresh.load_state_dict(state)
    assert fresh.epsilon() == pytest.approx(c.epsilon()) and fresh.denominator == c.denominator
    with pytest.raises(privacy.PrivacyStateError):
        fresh.load_state_dict(None)
    other = CentralDp(noise_multiplier=2.0, clip=1.0, sample_rate=0.2, target_epsilon=8.0,
                      delta=1e-5, num_rounds=5)
    with pytest.raises(privacy.PrivacyStateError, match="noise_multiplier"):
        other.load_state_dict(state)


@pytest.mark.parametrize("overrides,key", [
    ({"dp-mode": "client", "aggregator": "svd"}, "aggregator"),
    ({"dp-mode": "client", "aggregator": "stack"}, "aggregator"),
    ({"dp-mode": "sample+client", "aggregator": "svd"}, "aggregator"),
    ({"dp-mode": "update+client"}, "dp-mode"),
    ({"dp-mode": "client+sample"}, "dp-mode"),
    ({"dp-mode": "sample+client", "local-epochs": 1}, "local-epochs"),
])
def test_bad_client_mode_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        parse_run_config(overrides)
    assert info.value.key == key


def test_user_level_dp_takes_exactly_the_aggregators_whose_global_is_the_mean():
    """Each aggregator declares whether its new global adapter is the weighted mean of the
    sent tensors (``Method.linear``); the declaration is checked against its aggregate, and
    user-level DP accepts exactly the linear ones."""
    from fedlora.aggregation import METHODS, get_method

    rng = np.random.default_rng(0)
    glob = {"m.lora_A.weight": rng.normal(size=(2, 6)).astype(np.float32),
            "m.lora_B.weight": rng.normal(size=(5, 2)).astype(np.float32),
            "classifier.bias": rng.normal(size=2).astype(np.float32)}
    weights = [1, 2, 3]
    for name, cls in METHODS.items():
        method = get_method(name, alpha=4.0, rank=2)
        sent = {k: v for k, v in glob.items() if not (cls.freeze_a and "lora_A" in k)}
        replies = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in sent.items()}
                   for _ in weights]
        out = method.aggregate(replies, weights, glob)
        p = np.asarray(weights) / sum(weights)
        is_mean = all(np.allclose(out[k], sum(w * r[k] for w, r in zip(p, replies)), atol=1e-5)
                      for k in replies[0])
        assert is_mean == cls.linear, name
        try:
            parse_run_config({"dp-mode": "client", "aggregator": name})
        except ConfigError as e:
            assert not cls.linear and e.key == "aggregator"
        else:
            assert cls.linear


def test_delta_must_be_below_one_over_the_number_of_clients():
    c = CentralDp(noise_multiplier=1.0, clip=1.0, sample_rate=0.5, target_epsilon=8.0,
                  delta=0.01, num_rounds=2)
    with pytest.raises(ConfigError) as info:
        c.start_round(1, num_nodes=100)  # delta = 1/N
    assert info.value.key == "target-delta" and "N = 100 clients" in str(info.value)
    c.start_round(1, num_nodes=99)  # below 1/N: fine (examples do not matter here)


def test_client_mode_plans_nothing_on_the_client_and_sample_on_a_combination():
    assert privacy.plan_for(parse_run_config({"dp-mode": "client", "target-delta": 0.01}), 20) is None
    plan = privacy.plan_for(parse_run_config({"dp-mode": "sample+client", "target-delta": 1e-3}), 400)
    assert plan.mode == "sample" and plan.sample_rate == pytest.approx(32 / 400)


def _privacy_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "privacy.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_client_mode_run_writes_the_servers_epsilon(custom_task):
    overrides = dict(custom_task, **{"dp-mode": "client", "target-epsilon": 2.0,
                                     "target-delta": 1e-3, "update-max-norm": 0.5,
                                     "fraction-evaluate": 0.0, "run-name": "cdp"})
    run = run_in_process(overrides, num_nodes=4)
    rows = _privacy_rows(run)
    assert [r["node"] for r in rows] == ["server", "server"]
    assert {r["mode"] for r in rows} == {"client"}
    eps = [float(r["epsilon"]) for r in rows]
    assert all(math.isfinite(e) for e in eps) and 0 < eps[0] < eps[1] <= 2.0
    assert eps[1] > 0.97 * 2.0  # calibrated for the 2 planned rounds
    assert [int(r["steps"]) for r in rows] == [1, 2]
    assert float(rows[0]["sample_rate"]) == 0.5
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    assert [r["max_epsilon"] for r in rounds[1:]] == pytest.approx(eps)
    assert all(r["test_loss"] is not None and math.isfinite(r["test_loss"]) for r in rounds)

    # The checkpoint holds the server's ledger: a resumed server starts from the spent budget.
    from fedlora.checkpoint import load_checkpoint

    restored = CentralDp.from_config(parse_run_config(overrides))
    restored.load_state_dict(load_checkpoint(run).extra["central-dp"])
    assert restored.epsilon() == pytest.approx(eps[-1]) and restored.denominator == 2.0
    with pytest.raises(privacy.BudgetExhausted):
        restored.start_round(3, num_nodes=4)
    run_in_process(dict(overrides, resume=True), num_nodes=4)  # finished: restores, no error
    assert len(_privacy_rows(run)) == 2


@pytest.mark.slow
def test_sample_plus_client_keeps_both_ledgers(custom_task):
    overrides = dict(custom_task, **{"dp-mode": "sample+client", "target-epsilon": 3.0,
                                     "target-delta": 1e-3, "fraction-train": 1.0,
                                     "fraction-evaluate": 0.0, "run-name": "sdp"})
    run = run_in_process(overrides, num_nodes=4)
    rows = _privacy_rows(run)
    server = [r for r in rows if r["node"] == "server"]
    clients = [r for r in rows if r["node"] != "server"]
    assert len(server) == 2 and {r["mode"] for r in server} == {"client"}
    # How many clients replied is not published under user-level DP: their own (record-level)
    # ledger rows would tell, so they stay on the sites.
    assert clients == []
    rounds = json.loads((run / "metrics.json").read_text())["rounds"][1:]
    for r in rounds:
        assert r["clients_sampled"] == 4  # q = 1: the server's coins, no data in them
        assert r["clients_accepted"] is None and r["clients_refused"] is None
        assert r["clients_dropped"] is None and r["bytes_up"] is None
        assert r["refused"] == [] and r["dropped"] == []
    comms = json.loads((run / "comms.json").read_text())
    assert comms["total_bytes"]["up"] == 0 and comms["total_bytes"]["down"] > 0
    for r in rows:
        assert 0 < float(r["epsilon"]) <= 3.0 + 1e-9
    # q = 1 (every client every round): no amplification, so a larger sigma than sample's
    assert float(server[0]["sample_rate"]) == 1.0
