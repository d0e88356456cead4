"""Differential privacy in training: private steps, update noise, budgets across runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora import privacy
from fedlora.adapters import adapter_state
from fedlora.config import ConfigError
from fedlora.data import EncodedDataset, read_table
from fedlora.dp_sgd import train_private
from fedlora.models import LoraSpec, build_lora_model, load_tokenizer
from fedlora.privacy.count import count_history
from fedlora.runtime import parse_run_config

from .conftest import write_reviews
from .test_simulation import run_in_process


def test_a_private_step_trains_the_factors_and_nothing_else(tiny_model_dir, tmp_path):
    model = build_lora_model(LoraSpec(str(tiny_model_dir), 2, 4, 8.0, 0.0, ("query", "value"), True))
    data = read_table(write_reviews(tmp_path / "r.csv", 64), text_column="text",
                      label_column="label", label_names=("negative", "positive"))
    enc = EncodedDataset(data, load_tokenizer(str(tiny_model_dir)), 16)
    before = adapter_state(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_private(model, enc, np.arange(64), steps=2, batch_size=16, learning_rate=1e-2,
                  noise_multiplier=1.0, max_grad_norm=1.0)
    after = adapter_state(model)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert sorted(changed) == sorted(before)  # every LoRA factor (and the head) moved
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(frozen[n], p), n
    # The hooks are gone: the cached model can serve a non-private client next.
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_update_noise_has_the_calibrated_scale():
    rng = np.random.default_rng(0)
    received = {"m.lora_A.weight": rng.normal(size=(8, 300)).astype(np.float32),
                "m.lora_B.weight": rng.normal(size=(300, 8)).astype(np.float32)}
    step = {k: v + 1e-3 * rng.normal(size=v.shape).astype(np.float32) for k, v in received.items()}
    sigma, c = 1.7, 0.5
    noised = privacy.privatize_reply(step, received, max_norm=c, noise_multiplier=sigma)
    # small update (norm < c): not clipped, so noised - clean is pure noise of std sigma * 2c
    diff = np.concatenate([(noised[k].astype(np.float64) - step[k]).ravel() for k in step])
    n, std = diff.size, sigma * 2 * c
    se = std / np.sqrt(2 * (n - 1))  # standard error of the sample std
    assert abs(diff.std() - std) < 4 * se
    assert abs(diff.mean()) < 4 * std / np.sqrt(n)


def test_calibrated_plan_ends_at_or_just_under_the_target():
    cfg = parse_run_config({"dp-mode": "sample", "target-epsilon": 2.0, "num-server-rounds": 5,
                            "dp-recipe": "none",
                            "local-steps": 10, "batch-size": 32})
    plan = privacy.plan_for(cfg, 500)
    ledger = privacy.Ledger(plan, path=None, state=None)
    eps = []
    with ledger.session():
        for _ in range(cfg.num_server_rounds):
            ledger.check()
            eps.append(ledger.spend())
        assert eps == sorted(eps) and 0.97 * 2.0 < eps[-1] <= 2.0
        independent = privacy.epsilon_dp_accounting(noise_multiplier=plan.noise_multiplier,
                                                    sample_rate=32 / 500, steps=50, delta=1e-5)
        assert eps[-1] == pytest.approx(independent, rel=0.01)
        with pytest.raises(privacy.BudgetExhausted, match="budget exhausted"):
            ledger.check()


def test_ledger_file_survives_a_restart_and_a_lost_file(tmp_path):
    cfg = parse_run_config({"dp-mode": "sample", "target-epsilon": 3.0, "num-server-rounds": 3,
                            "dp-recipe": "none"})
    plan = privacy.plan_for(cfg, 400)
    path = tmp_path / "site" / "privacy.json"
    path.parent.mkdir()
    def ledger():
        return privacy.Ledger(plan, path=str(path), state=None)

    with ledger().session() as first:
        first.spend()
        spent = first.spend()
    with ledger().session() as again:  # a restarted site
        assert again.epsilon() == pytest.approx(spent) and again.epsilon() > 0
    path.write_text("{ truncated")  # a damaged ledger falls back to its backup, never to zero
    with ledger().session() as restored:
        assert restored.epsilon() > 0
    path.with_name(path.name + ".bak").write_text("garbage")
    with pytest.raises(privacy.PrivacyStateError), ledger().session():
        pass


@pytest.mark.parametrize("key,value", [("target-epsilon", 0.0), ("target-epsilon", -1),
                                       ("target-delta", 1.0), ("target-delta", 0.0),
                                       ("max-grad-norm", 0.0), ("dp-mode", "loud"),
                                       ("accountant", "moments")])
def test_bad_privacy_settings_fail_before_round_one(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_run_config({key: value})


def test_delta_must_be_below_one_over_n():
    cfg = parse_run_config({"dp-mode": "sample", "target-delta": 0.01})
    with pytest.raises(ValueError, match="target-delta"):
        privacy.plan_for(cfg, 200)


def _privacy_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "privacy.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_budget_is_kept_across_runs_and_exhausted_clients_refuse(custom_task, tmp_path):
    from simulations.harness import node_config_mod

    ledgers = tmp_path / "ledgers"
    ledgers.mkdir()
    mod = node_config_mod(lambda pid: {"privacy-state-path": str(ledgers / f"site{pid}.json")})
    overrides = dict(custom_task, **{"dp-mode": "sample", "target-epsilon": 1.0,
                                     "dp-recipe": "none", "target-delta": 1e-3, "fraction-train": 1.0,
                                     "fraction-evaluate": 0.0, "run-name": "dp1"})
    run1 = run_in_process(overrides, num_nodes=4, mods=[mod])
    rows = _privacy_rows(run1)
    assert len(rows) == 2 * 4
    assert {r["mode"] for r in rows} == {"sample"}
    assert sorted({int(r["steps"]) for r in rows}) == [3, 6]  # local-steps 3, two rounds
    for node in {r["node"] for r in rows}:
        eps = [float(r["epsilon"]) for r in rows if r["node"] == node]
        assert eps == sorted(eps) and eps[-1] <= 1.0 + 1e-9 and eps[-1] > 0.9
    metrics = json.loads((run1 / "metrics.json").read_text())
    assert metrics["rounds"][-1]["max_epsilon"] <= 1.0

    # The same sites join a new run: their ledgers say the budget is spent.
    run2 = run_in_process(dict(overrides, **{"run-name": "dp2"}), num_nodes=4, mods=[mod])
    rounds = json.loads((run2 / "metrics.json").read_text())["rounds"]
    assert all(r["clients_accepted"] == 0 and r["clients_refused"] == 4 for r in rounds[1:])
    assert all("budget exhausted" in x["reason"] for r in rounds[1:] for x in r["refused"])


def test_calibrated_sigma_is_remembered_across_processes_and_checked(tmp_path, monkeypatch):
    import json

    from fedlora import privacy
    from fedlora.privacy import mechanisms

    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    args = (3.0, 1e-5, 0.04, 60, "rdp")
    mechanisms.calibrated_sigma.cache_clear()
    sigma = mechanisms.calibrated_sigma(*args)
    stored = json.loads((tmp_path / mechanisms.SIGMA_CACHE_FILE).read_text())
    assert list(stored.values()) == [sigma]

    # Another process (a fresh in-process cache) reads the file instead of calibrating.
    def no_calibration(**_):
        raise AssertionError("calibrated again although the value was remembered")

    mechanisms.calibrated_sigma.cache_clear()
    monkeypatch.setattr(privacy.accounting, "calibrate_noise_multiplier", no_calibration)
    assert mechanisms.calibrated_sigma(*args) == sigma

    # A remembered value that would overspend the budget is not trusted.
    key = next(iter(stored))
    (tmp_path / mechanisms.SIGMA_CACHE_FILE).write_text(json.dumps({key: sigma / 3}))
    monkeypatch.undo()
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    mechanisms.calibrated_sigma.cache_clear()
    assert mechanisms.calibrated_sigma(*args) == pytest.approx(sigma)
    eps = privacy.epsilon_of_history([(mechanisms.calibrated_sigma(*args), 0.04, 60)], delta=1e-5)
    assert eps <= 3.0
    # A damaged file is ignored.
    (tmp_path / mechanisms.SIGMA_CACHE_FILE).write_text("{not json")
    mechanisms.calibrated_sigma.cache_clear()
    assert mechanisms.calibrated_sigma(*args) == pytest.approx(sigma)
    mechanisms.calibrated_sigma.cache_clear()


def test_a_client_whose_ledger_did_not_survive_a_restart_charges_the_rounds_before(
        identity, site):
    """A resumed simulation starts clients with empty context.state: a client charges the
    rounds before the restart, and the interrupted one, as if it had trained in every one
    (never restarts at zero)."""
    from fedlora.protocol import CONFIG_KEY, METRICS_KEY, STATUS_KEY

    from .test_dp_attacks import _run_site, _train_message

    # Planned for 6 rounds: 4 charged rounds and a second count release fit whatever the
    # count drawn (planned for 4, the last round could exceed the target by a hair).
    run_config = dict(site, **{"dp-mode": "sample", "dp-recipe": "none",
                               "num-server-rounds": 6})
    msg = _train_message(run_config, server_round=3)
    msg.content[CONFIG_KEY]["resumed-after"] = 2
    reply = _run_site(run_config, {"partition-id": 0, "num-partitions": 2}, msg)
    assert reply.content[STATUS_KEY]["status"] == "ok"
    metrics = reply.content[METRICS_KEY]
    plan = privacy.plan_for(parse_run_config(run_config), int(metrics["num-examples"]))
    # rounds 1 and 2 and the interrupted round 3 charged, then round 3 spent; the example
    # count released before the restart and the one released now both charged
    assert metrics["dp-steps"] == 4 * plan.steps
    assert metrics["dp-epsilon"] == pytest.approx(privacy.epsilon_of_history(
        [*count_history(plan.count_noise, releases=2),
         (plan.noise_multiplier, plan.sample_rate, 4 * plan.steps)], delta=plan.delta))


def test_a_later_run_can_neither_raise_a_sites_budget_nor_find_it_forgotten(tmp_path):
    path = tmp_path / "site" / "privacy.json"

    def ledger(eps: float, delta: float = 1e-5, state=None):
        cfg = parse_run_config({"dp-mode": "sample", "target-epsilon": eps, "dp-recipe": "none",
                                "target-delta": delta, "num-server-rounds": 2})
        return privacy.Ledger(privacy.plan_for(cfg, 400), path=str(path), state=state)

    with ledger(1.0).session() as first:
        for _ in range(2):
            first.check()
            first.spend()
        record = first.record()
    with ledger(8.0).session() as later:  # asks for more: the site's own cap stays
        assert later.cap() == 1.0
        with pytest.raises(privacy.BudgetExhausted):
            later.check()
    with pytest.raises(privacy.PrivacyStateError, match="delta"), ledger(8.0, 1e-6).session():
        pass
    # The file and its backup vanish while this run's state still holds a spend: refuse.
    path.unlink()
    path.with_name(path.name + ".bak").unlink(missing_ok=True)
    with pytest.raises(privacy.PrivacyStateError, match="gone"), \
            ledger(1.0, state=record).session():
        pass
