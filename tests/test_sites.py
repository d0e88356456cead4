"""Sites with their own data files: bad data is reported by the site, never crashes the run."""

from __future__ import annotations

import json

from simulations.harness import node_config_mod, read_metrics, run_inprocess
from tests.conftest import write_reviews
from tests.test_simulation import custom_task  # noqa: F401  (fixture)


def test_sites_with_bad_data_reply_that_they_could_not_train(custom_task, tmp_path):  # noqa: F811
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
        assert "data file not found" in reasons and "missing.csv" in reasons
        assert "holds no rows" in reasons
        assert "no column 'text'" in reasons
        assert "unknown label 'meh'" in reasons
