"""Sites with their own data files: bad data is reported by the site, never crashes the run."""

from __future__ import annotations

import json

import pytest

from simulations.harness import node_config_mod, read_metrics, run_inprocess
from tests.conftest import write_reviews


@pytest.mark.slow
def test_sites_with_bad_data_reply_that_they_could_not_train(custom_task, tmp_path):
    good = write_reviews(tmp_path / "site0.csv", 60, seed=3)
    empty = tmp_path / "site2.csv"
    empty.write_text("")
    wrong_columns = tmp_path / "site3.jsonl"
    wrong_columns.write_text(json.dumps({"review": "fine film", "label": "positive"}) + "\n")
    unknown_label = tmp_path / "site4.csv"
    unknown_label.write_text("text,label\ngreat film,positive\nodd film,meh\n")
    site_data = {0: good, 1: tmp_path / "missing.csv", 2: empty, 3: wrong_columns,
                 4: unknown_label}
    mod = node_config_mod(lambda pid: {"data-path": str(site_data[pid])})
    overrides = dict(custom_task, **{"fraction-train": 1.0, "fraction-evaluate": 1.0,
                                     "num-server-rounds": 2, "run-name": "sites"})
    overrides.pop("data-path")  # each site reads its own file (node-config data-path)
    run_dir = run_inprocess(overrides, num_nodes=5, mods=[mod], total_cpus=2)

    rounds = read_metrics(run_dir)["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]  # the run finished
    for r in rounds[1:]:
        assert r["clients_accepted"] == 1 and r["clients_refused"] == 4
        reasons = " | ".join(x["reason"] for x in r["refused"])
        assert all(x["reason"].startswith("could-not-train: ") for x in r["refused"]), reasons
        assert "data file not found" in reasons and "missing.csv" in reasons
        assert "holds no rows" in reasons
        assert "no column 'text'" in reasons
        assert "unknown label 'meh'" in reasons


def test_simulated_fates_are_reproducible_and_in_proportion():
    from fedlora.app.client.client_app import simulated_fate
    from fedlora.runtime import parse_run_config

    cfg = parse_run_config({"dropout-fraction": 0.2, "straggler-fraction": 0.1, "seed": 3})
    fates = [simulated_fate(cfg, rnd, pid) for rnd in range(1, 51) for pid in range(100)]
    assert fates == [simulated_fate(cfg, rnd, pid) for rnd in range(1, 51) for pid in range(100)]
    assert abs(fates.count("drop") / len(fates) - 0.2) < 0.02
    assert abs(fates.count("straggle") / len(fates) - 0.1) < 0.02
    # Independent across rounds: not the same clients every time.
    assert [simulated_fate(cfg, 1, p) for p in range(100)] != \
        [simulated_fate(cfg, 2, p) for p in range(100)]
    off = parse_run_config({})
    assert {simulated_fate(off, r, p) for r in range(1, 5) for p in range(50)} == {"ok"}


@pytest.mark.slow
def test_failing_and_straggling_clients_are_dropped_and_the_round_goes_on(custom_task):
    from fedlora.app.client.client_app import simulated_fate
    from fedlora.runtime import parse_run_config

    n = 4
    keys = {"dropout-fraction": 0.25, "straggler-fraction": 0.25, "straggler-delay": 30.0}
    # A seed under which round 1 goes well (it loads the model in every worker) and round 2
    # has at least one failure, one straggler and two good nodes.
    for seed in range(1000):
        cfg = parse_run_config(dict(keys, seed=seed))
        first = [simulated_fate(cfg, 1, p) for p in range(n)]
        fates = [simulated_fate(cfg, 2, p) for p in range(n)]
        if first.count("ok") == n and fates.count("drop") >= 1 \
                and fates.count("straggle") >= 1 and fates.count("ok") >= 2:
            break
    overrides = dict(custom_task, **keys, **{
        "seed": seed, "num-server-rounds": 2, "fraction-train": 1.0, "fraction-evaluate": 0.0,
        "round-timeout": 25.0, "num-partitions": n, "run-name": "flaky"})
    # One simulation worker per client, so a sleeping straggler holds up nobody else.
    run_dir = run_inprocess(overrides, num_nodes=n, total_cpus=n)
    r0, r1 = read_metrics(run_dir)["rounds"][1:]
    assert r0["clients_accepted"] == n and r0["clients_dropped"] == 0
    assert r1["clients_sampled"] == n
    assert r1["clients_accepted"] == fates.count("ok")
    assert r1["clients_dropped"] == fates.count("drop") + fates.count("straggle")
    reasons = [d["reason"] for d in r1["dropped"]]
    assert sum("simulated failure" in x for x in reasons) == fates.count("drop"), reasons
    assert sum("no reply before the round's timeout" in x for x in reasons) == \
        fates.count("straggle"), reasons
    assert r1["test_accuracy"] is not None  # the round aggregated the good replies
