"""A site's example count under DP, against an attacker who reads every reply.

Under ``dp-mode = sample`` (add or remove one example) the exact count would tell
membership outright; under ``update`` (any change of the site's data) any count would.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedlora import privacy
from fedlora.privacy.count import COUNT_NOISE_STD, MIN_DENOMINATOR, count_history, noised_count
from fedlora.protocol import CONFIG_KEY, METRICS_KEY, STATUS_KEY
from fedlora.runtime import parse_run_config

from .test_dp_attacks import _train_message


def _train_examples(run_config: dict) -> int:
    """The real size of partition 0: what the site must never release."""
    from fedlora import runtime

    cfg = runtime.resolve_config(run_config)
    return runtime.client_data(cfg, partition_id=0, num_partitions=2, data_path=None).num_train


def _membership_accuracy(counts_without: np.ndarray, counts_with: np.ndarray) -> float:
    """The best threshold test 'count >= t means the example is in': its accuracy."""
    both = np.concatenate([counts_without, counts_with])
    truth = np.concatenate([np.zeros(len(counts_without)), np.ones(len(counts_with))])
    best = 0.0
    for t in np.unique(both):
        best = max(best, float(np.mean((both >= t) == truth)))
    return best


def test_the_released_count_does_not_tell_membership():
    n, draws = 500, 20_000
    without = np.array([noised_count(n) for _ in range(draws)])
    with_one = np.array([noised_count(n + 1) for _ in range(draws)])
    # The exact count (what a site released before) answers every time...
    assert _membership_accuracy(np.full(draws, n), np.full(draws, n + 1)) == 1.0
    # ...the noised one about as well as a coin: total variation 2 Phi(1/(2 sigma)) - 1 = 0.008.
    assert _membership_accuracy(without, with_one) < 0.53
    assert without.std() == pytest.approx(COUNT_NOISE_STD, rel=0.05)
    # From OS entropy: nobody holding the run-config can regenerate it.
    assert len({noised_count(n) for _ in range(20)}) > 10


def test_a_plan_charges_the_count_and_ends_within_the_target():
    cfg = parse_run_config({"dp-mode": "sample", "target-epsilon": 1.0})
    plan = privacy.plan_for(cfg, 530)
    q, steps = plan.cost(plan.probe_rounds + 1)
    lora_rounds = cfg.num_server_rounds - plan.probe_rounds
    history = [*count_history(plan.count_noise),
               (plan.noise_multiplier, q, lora_rounds * steps),
               (plan.noise_multiplier, 1.0, plan.probe_rounds * plan.probe_steps)]
    spent = privacy.epsilon_of_history(history, delta=plan.delta)
    assert 0.98 <= spent <= 1.0
    without_count = privacy.epsilon_of_history(history[1:], delta=plan.delta)
    assert without_count < spent  # the count's release is in the budget, not on top of it
    assert plan.sample_rate == pytest.approx(cfg.batch_size / 530)
    assert plan.weight == 530


def _context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                   state=RecordDict(), run_config=run_config)


def test_a_site_releases_one_noised_count_for_the_whole_run(identity, site, monkeypatch):
    from fedlora import dp_sgd
    from fedlora.app.client.client_app import train_fn

    seen = []
    real = dp_sgd.train_private

    def spy(*args, **kwargs):
        seen.append((len(args[2]), kwargs["sample_rate"], kwargs["expected_batch_size"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(dp_sgd, "train_private", spy)
    run_config = dict(site, **{"dp-mode": "sample", "dp-recipe": "none"})
    context = _context(run_config)
    released = []
    for rnd in (1, 2):
        msg = _train_message(run_config, server_round=rnd)
        reply = train_fn(msg, context)
        assert reply.content[STATUS_KEY]["status"] == "ok"
        released.append(dict(reply.content[METRICS_KEY]))
    counts = {int(m["num-examples"]) for m in released}
    assert len(counts) == 1  # the same value every round: nothing to average away
    count = counts.pop()
    cfg = parse_run_config(run_config)
    for m in released:
        assert m["dp-sample-rate"] == pytest.approx(min(1.0, cfg.batch_size / count))
    # Training used the released count for q and the denominator, the real one for nothing
    # but the examples it samples from.
    assert len(seen) == 2
    for n, q, denominator in seen:
        assert n == _train_examples(run_config)
        assert q == pytest.approx(min(1.0, cfg.batch_size / count))
        assert denominator == cfg.batch_size  # public, whatever the count
    # The ledger recorded one release of the count, and epsilon includes it.
    acc = privacy.from_record_dict(dict(context.state["fedlora-privacy"]))
    assert acc.count == count and acc.count_releases == [COUNT_NOISE_STD]
    plan = privacy.plan_for(cfg, count)
    assert released[-1]["dp-epsilon"] == pytest.approx(privacy.epsilon_of_history(
        [*count_history(COUNT_NOISE_STD), (plan.noise_multiplier, plan.sample_rate,
                                           2 * plan.steps)], delta=plan.delta))


def test_sites_of_equal_size_release_different_counts(identity, site, tmp_path):
    """Three sites with the same data (deployed: one ledger file each): the server does not
    read one size off their replies."""
    from fedlora.app.client.client_app import train_fn

    run_config = dict(site, **{"dp-mode": "sample", "dp-recipe": "none"})
    counts = []
    for i in range(3):
        node = {"data-path": site["data-path"], "accept-dp-modes": "sample",
                "privacy-state-path": str(tmp_path / f"site{i}" / "privacy.json")}
        context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                          run_config=run_config)
        reply = train_fn(_train_message(run_config), context)
        counts.append(int(reply.content[METRICS_KEY]["num-examples"]))
        # The count is on file with the ledger, so a restarted site keeps it.
        stored = privacy.load_state(node["privacy-state-path"])
        assert stored.count == counts[-1]
    assert len(set(counts)) > 1, counts


def test_under_update_dp_every_site_weighs_the_same(identity, site):
    from fedlora.app.client.client_app import train_fn

    run_config = dict(site, **{"dp-mode": "update"})
    context = _context(run_config)
    reply = train_fn(_train_message(run_config), context)
    assert reply.content[STATUS_KEY]["status"] == "ok"
    assert reply.content[METRICS_KEY]["num-examples"] == 1
    acc = privacy.from_record_dict(dict(context.state["fedlora-privacy"]))
    assert acc.count is None and acc.count_releases == []


def test_a_probe_step_divides_by_the_released_count(identity, site, monkeypatch):
    from fedlora import probe
    from fedlora.app.client.client_app import train_fn

    seen = []
    real = probe._descend_private

    def spy(*args):
        seen.append((len(args[3]), args[-1]))
        return real(*args)

    monkeypatch.setattr(probe, "_descend_private", spy)
    run_config = dict(site, **{"dp-mode": "sample"})  # the recipe: round 1 probes
    context = _context(run_config)
    msg = _train_message(run_config, server_round=1)
    assert msg.content[CONFIG_KEY]["server-round"] == 1
    reply = train_fn(msg, context)
    assert reply.content[STATUS_KEY]["status"] == "ok"
    (n, denominator), = seen
    assert n == _train_examples(run_config)
    count = reply.content[METRICS_KEY]["num-examples"]
    assert denominator == max(count, MIN_DENOMINATOR)


def test_a_ledger_keeps_its_count_and_old_code_cannot_drop_it(tmp_path, caplog):
    acc = privacy.PrivacyBudget("rdp", target_epsilon=1.0, target_delta=1e-5)
    acc.record_count(512, noise_std=COUNT_NOISE_STD)
    acc.step(noise_multiplier=5.0, sample_rate=0.06, num_steps=10)
    state = acc.state_dict()
    assert state["version"] == 2  # a reader of version 1 refuses it rather than drop the count
    back = privacy.PrivacyBudget.from_state_dict(state)
    assert (back.count, back.count_releases) == (512, [COUNT_NOISE_STD])
    assert back.epsilon() == pytest.approx(acc.epsilon())
    assert acc.epsilon() > privacy.epsilon_of_history(acc.history, delta=1e-5)
    for forgets in ({**state, "count_releases": []},
                    {**state, "count": 600}):  # another count, same releases
        with pytest.raises(privacy.PrivacyStateError):
            acc.load_state_dict(forgets)
    path = tmp_path / "ledger.json"
    privacy.save_state(path, acc)
    other = privacy.PrivacyBudget.from_state_dict({**state, "count": 600})
    with pytest.raises(privacy.PrivacyStateError):
        privacy.save_state(path, other)
    # A ledger from before the count was noised is read, with a warning.
    old = {k: v for k, v in state.items() if k not in ("count", "count_releases")}
    old["version"] = 1
    with caplog.at_level("WARNING"):
        assert privacy.PrivacyBudget.from_state_dict(old).count is None
    assert "exact example count" in caplog.text


def test_a_count_release_is_never_redrawn_when_planning_fails(identity, site):
    """target-delta above 1/count: the site cannot plan, says so, and keeps the count it
    released (charged), so the next round cannot draw another one."""
    from fedlora.app.client.client_app import train_fn

    run_config = dict(site, **{"dp-mode": "sample", "dp-recipe": "none", "target-delta": 0.3})
    context = _context(run_config)
    seen = set()
    for rnd in (1, 2, 3):
        reply = train_fn(_train_message(run_config, server_round=rnd), context)
        status = reply.content[STATUS_KEY]
        acc = privacy.from_record_dict(dict(context.state["fedlora-privacy"]))
        assert acc.count_releases == [COUNT_NOISE_STD]
        seen.add(acc.count)
        if status["status"] != "ok":
            assert "target-delta" in status["reason"]
    assert len(seen) == 1


def test_private_clients_run_the_configured_steps_whatever_their_size():
    from fedlora.config import ConfigError

    for mode in ("sample", "update"):
        with pytest.raises(ConfigError, match="local-epochs"):
            parse_run_config({"dp-mode": mode, "local-epochs": 1})
    with pytest.raises(ConfigError, match="target-epsilon"):
        parse_run_config({"dp-mode": "sample", "target-epsilon": 0.05})
