"""The head that fits its checkpoint, linear-probe rounds (private and not), their accounting,
and the DP recipe's run-config."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fedlora import privacy
from fedlora.adapters import adapter_state
from fedlora.config import ConfigError, defaults
from fedlora.data import EncodedDataset, read_table
from fedlora.heads import checkpoint_pooling, head_inputs, resolve_head_pooling
from fedlora.models import LoraSpec, build_lora_model, load_tokenizer
from fedlora.privacy.mechanisms import DpPlan
from fedlora.probe import train_head
from fedlora.runtime import parse_run_config
from fedlora.tasks import minilm_path

from .conftest import write_reviews


def _mean_pooled_dir(tiny_model_dir, tmp_path):
    """The tiny BERT made to look like a sentence-transformers mean-pooling checkpoint."""
    path = tmp_path / "st-tiny"
    shutil.copytree(tiny_model_dir, path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    return path


def _spec(path, pooling="mean"):
    return LoraSpec(str(path), 2, 4, 8.0, 0.0, ("query", "value"), True, pooling=pooling)


def _data(path, tmp_path, n=48):
    rows = read_table(write_reviews(tmp_path / "r.csv", n), text_column="text",
                      label_column="label", label_names=("negative", "positive"))
    return EncodedDataset(rows, load_tokenizer(str(path)), 16)


def test_the_packaged_minilm_is_read_by_mean_pooling_under_dp_only(tiny_model_dir):
    assert checkpoint_pooling(minilm_path()) == "mean"
    assert checkpoint_pooling(str(tiny_model_dir)) is None
    assert resolve_head_pooling("auto", minilm_path(), private=True) == "mean"
    assert resolve_head_pooling("auto", minilm_path(), private=False) == "model"
    assert resolve_head_pooling("auto", str(tiny_model_dir), private=True) == "model"
    assert resolve_head_pooling("mean", str(tiny_model_dir), private=False) == "mean"


def test_a_mean_pooled_head_keeps_the_keys_of_the_models_own(tiny_model_dir, tmp_path):
    mean = adapter_state(build_lora_model(_spec(tiny_model_dir, "mean")))
    own = adapter_state(build_lora_model(_spec(tiny_model_dir, "model")))
    assert set(mean) == set(own)
    assert any(k.endswith("classifier.weight") for k in mean)


def test_a_mean_pooled_head_ignores_padding(tiny_model_dir, tmp_path):
    model = build_lora_model(_spec(tiny_model_dir)).eval()
    data = _data(tiny_model_dir, tmp_path)
    short = min(range(len(data)), key=lambda i: len(data.input_ids[i]))
    long = max(range(len(data)), key=lambda i: len(data.input_ids[i]))
    assert len(data.input_ids[short]) < len(data.input_ids[long])
    alone = model(**{k: v for k, v in data.collate([short]).items() if k != "labels"}).logits
    padded = model(**{k: v for k, v in data.collate([short, long]).items()
                      if k != "labels"}).logits[0]
    assert torch.allclose(alone[0], padded, atol=1e-5)


def test_head_inputs_come_back_in_the_order_asked(tiny_model_dir, tmp_path):
    model = build_lora_model(_spec(tiny_model_dir))
    data = _data(tiny_model_dir, tmp_path)
    idx = np.random.default_rng(0).permutation(len(data))[:20]
    feats = head_inputs(model, data, idx, batch_size=7)
    one = [head_inputs(model, data, idx[j : j + 1])[0] for j in (0, 7, 19)]
    for j, row in zip((0, 7, 19), one):
        assert torch.allclose(feats[j], row, atol=1e-5)


def _lora_and_head(model):
    state = adapter_state(model)
    return ({k: v for k, v in state.items() if "lora_" in k},
            {k: v for k, v in state.items() if "classifier" in k})


def test_a_probe_round_trains_the_head_alone_and_learns(tiny_model_dir, tmp_path):
    model = build_lora_model(_spec(tiny_model_dir))
    data = _data(tiny_model_dir, tmp_path)
    lora0, head0 = _lora_and_head(model)
    res = train_head(model, data, np.arange(len(data)), steps=30, learning_rate=0.05)
    lora1, head1 = _lora_and_head(model)
    assert all(np.array_equal(lora0[k], lora1[k]) for k in lora0)
    assert any(not np.array_equal(head0[k], head1[k]) for k in head0)
    assert res.steps == 30 and res.examples == 30 * len(data)
    feats = head_inputs(model, data, np.arange(len(data)))
    from fedlora.heads import head_module

    logits = head_module(model)(feats)
    loss = torch.nn.functional.cross_entropy(logits, data.labels).item()
    assert loss < 0.69  # below chance (ln 2): the head learned from the data


def test_a_private_probe_round_draws_fresh_noise_that_replay_cannot_remove(tiny_model_dir,
                                                                           tmp_path):
    """The attacker knows the data, the start and the config: replaying the probe round
    without noise leaves a residual, and two identical private rounds differ."""
    data = _data(tiny_model_dir, tmp_path)
    idx = np.arange(len(data))
    outs = []
    for noise in (1.0, 1.0, 0.0):  # the replay: the same clipped step, no noise
        model = build_lora_model(_spec(tiny_model_dir))
        train_head(model, data, idx, steps=1, learning_rate=1.0, noise_multiplier=noise,
                   max_grad_norm=1.0)
        outs.append(_lora_and_head(model)[1])
    key = next(k for k in outs[0] if k.endswith("weight"))
    a, b, replay = (o[key] for o in outs)
    assert not np.array_equal(a, b)
    # One step: lr * sigma * C / n per coordinate of noise; the replay (clipped, no noise)
    # is off by exactly that much noise, not by a clipping difference.
    residual = (a - replay).ravel()
    expected = 1.0 * 1.0 * 1.0 / len(idx)
    assert residual.std() == pytest.approx(expected, rel=0.35)


def test_probe_rounds_are_accounted_at_rate_one_with_the_run_sigma():
    cfg = parse_run_config(defaults(), {"dp-mode": "sample", "target-epsilon": 1.0})
    assert cfg.fraction_train == 1.0 and cfg.probe_rounds == 6
    plan = privacy.get_mechanism("sample").plan(cfg, 500)
    assert plan.probe_rounds == 6 and plan.cost(1) == (1.0, cfg.probe_steps)
    assert plan.cost(7) == (cfg.batch_size / 500, cfg.local_steps)
    history = [(plan.noise_multiplier, *plan.cost(r)) for r in range(1, 9)]
    spent = privacy.epsilon_of_history(history, delta=cfg.target_delta)
    assert 0.97 <= spent <= 1.0  # the whole planned run meets the target, just under
    ledger = privacy.Ledger(plan, path=None, state=None, server_round=1)
    with ledger.session():
        ledger.check()
        ledger.spend()
        assert ledger.metrics()["sample-rate"] == 1.0
        assert ledger.budget.total_steps == cfg.probe_steps


def test_the_dp_recipe_fills_only_keys_left_at_their_default():
    base = defaults()
    cfg = parse_run_config(base, {"dp-mode": "sample"})
    assert (cfg.fraction_train, cfg.probe_rounds) == (1.0, 6)
    cfg = parse_run_config(base, {"dp-mode": "sample", "fraction-train": 0.5,
                                  "probe-rounds": 3})
    assert (cfg.fraction_train, cfg.probe_rounds) == (0.5, 3)
    cfg = parse_run_config(base, {"dp-mode": "sample", "dp-recipe": "none"})
    assert (cfg.fraction_train, cfg.probe_rounds) == (0.2, 0)
    cfg = parse_run_config(base, {"dp-mode": "sample", "train-head": False})
    assert cfg.probe_rounds == 0
    cfg = parse_run_config(base, {"dp-mode": "off"})
    assert (cfg.fraction_train, cfg.probe_rounds) == (0.2, 0)


@pytest.mark.parametrize("overrides,key", [
    ({"probe-rounds": 9}, "probe-rounds"),
    ({"probe-rounds": 2, "train-head": False}, "probe-rounds"),
    ({"probe-rounds": 2, "dp-mode": "update"}, "probe-rounds"),
    ({"probe-rounds": 2, "dp-mode": "client"}, "probe-rounds"),
    ({"dp-recipe": "always"}, "dp-recipe"),
    ({"head-pooling": "cls"}, "head-pooling"),
    ({"probe-learning-rate": 0}, "probe-learning-rate"),
])
def test_bad_probe_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        parse_run_config(defaults(), overrides)
    assert e.value.key == key


def test_a_plan_without_probe_rounds_costs_the_same_every_round():
    plan = DpPlan(mode="sample", noise_multiplier=1.0, sample_rate=0.1, steps=5,
                  target_epsilon=1.0, delta=1e-5, accountant="rdp")
    assert plan.cost(1) == plan.cost(None) == (0.1, 5)


def test_the_recipe_gives_a_site_whose_probe_steps_are_mostly_noise_fewer_longer_ones():
    """A BBC News site of about 90 articles at epsilon 1: its full-batch steps would carry
    noise about 20 times their signal, so it takes fewer steps of the same total length,
    with sigma calibrated for the steps it takes and its whole plan within the target. A
    site of 530 keeps the run-config's schedule; dp-recipe = none keeps it everywhere."""
    from fedlora.privacy.accounting import epsilon_of_history
    from fedlora.privacy.count import count_history

    mechanism = privacy.client_mechanism("sample")
    cfg = parse_run_config({"task": "news", "dp-mode": "sample", "target-epsilon": 1.0})
    big, small = mechanism.plan(cfg, 530), mechanism.plan(cfg, 90)
    assert (big.probe_steps, big.probe_learning_rate) == (cfg.probe_steps,
                                                          cfg.probe_learning_rate)
    assert 1 <= small.probe_steps < cfg.probe_steps
    assert small.probe_steps * small.probe_learning_rate == pytest.approx(
        cfg.probe_steps * cfg.probe_learning_rate)
    assert small.noise_multiplier < 0.5 * big.noise_multiplier
    lora_rounds = cfg.num_server_rounds - cfg.probe_rounds
    history = [(small.noise_multiplier, small.sample_rate, lora_rounds * small.steps),
               (small.noise_multiplier, 1.0, cfg.probe_rounds * small.probe_steps),
               *count_history(small.count_noise)]
    spent = epsilon_of_history(history, delta=cfg.target_delta, accountant=cfg.accountant)
    assert cfg.target_epsilon * 0.95 < spent <= cfg.target_epsilon * 1.001
    assert [small.cost(r) for r in (1, cfg.probe_rounds + 1)] == [
        (1.0, small.probe_steps), (small.sample_rate, small.steps)]
    fixed = parse_run_config({"task": "news", "dp-mode": "sample", "target-epsilon": 1.0,
                              "dp-recipe": "none", "probe-rounds": 6, "fraction-train": 1.0})
    assert mechanism.plan(fixed, 90).probe_steps == fixed.probe_steps


@pytest.mark.parametrize("worst_case", [True, False], ids=["charged-worst", "naive"])
def test_a_resumed_site_that_lost_its_ledger_is_charged_no_less_than_it_spent(monkeypatch,
                                                                              worst_case):
    """A simulated site's ledger is lost on resume, and with it the count its probe
    schedule came from: before the restart it released 400 (20 steps, sigma 44.5); after
    it, 100 (2 steps, sigma 15). Charging the lost rounds at the new schedule would
    undercharge them; the worst schedule any count could give never does."""
    import functools

    import fedlora.privacy.ledger as ledger_module
    from fedlora.privacy.accounting import epsilon_of_history
    from fedlora.privacy.count import count_history

    mechanism = privacy.client_mechanism("sample")
    cfg = parse_run_config({"task": "news", "dp-mode": "sample", "target-epsilon": 1.0})
    before = mechanism.plan(cfg, 400)
    resumed_after = 5  # rounds 1-5 and the interrupted round 6: all probe rounds
    spent = epsilon_of_history(
        [(before.noise_multiplier, 1.0, before.probe_steps * (resumed_after + 1)),
         *count_history(50.0, releases=2)], delta=cfg.target_delta, accountant=cfg.accountant)
    monkeypatch.setattr(ledger_module, "noised_count", lambda n, *a, **k: 100)
    ledger = privacy.Ledger(
        lambda count: mechanism.plan(cfg, count), path=None, state=None, server_round=7,
        examples=90, terms=(cfg.accountant, 10.0, cfg.target_delta),
        worst_probe_round=functools.partial(mechanism.worst_probe_round, cfg)
        if worst_case else None)
    with ledger.session():
        ledger.charge_missed_rounds(resumed_after + 1)
    if worst_case:
        assert ledger.epsilon() >= spent
    else:  # what the test guards against: the naive charge reports less than was spent
        assert ledger.epsilon() < spent
