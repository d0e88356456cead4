"""The virtual-client benchmark's smoke path: both ClientApps train through the simulation
engine, and the table and result files report positive throughput and memory.

No timing is asserted: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import csv
import json

import pytest

from .conftest import write_reviews


@pytest.mark.slow
def test_quick_run_reports_both_patterns(tmp_path, tiny_model_dir, capsys):
    from simulations import bench_clients

    data = write_reviews(tmp_path / "train.csv", 160, seed=1)
    test = write_reviews(tmp_path / "test.csv", 24, seed=2)
    out = tmp_path / "bench"
    rc = bench_clients.main([
        "--quick", "--nodes", "4", "--per-round", "2", "--rounds", "2", "--partitions", "4",
        "--out", str(out),
        "--set", "task=custom", "--set", f"model-path={json.dumps(str(tiny_model_dir))}",
        "--set", f"data-path={json.dumps(str(data))}",
        "--set", f"test-data-path={json.dumps(str(test))}",
        "--set", "labels='negative,positive'", "--set", "lora-rank=4", "--set", "lora-alpha=8.0",
    ])
    assert rc == 0
    printed = capsys.readouterr().out

    result = json.loads((out / "results.json").read_text())
    rows = {r["pattern"]: r for r in result["rows"]}
    assert set(rows) == {"fedlora", "fedlora-bf16", "rebuild"}
    for pattern, row in rows.items():
        assert row["nodes"] == 4
        assert row["timed_updates"] == 2, pattern  # round 2 only: 2 clients
        assert row["all_updates"] == 4, pattern
        assert row["updates_per_s"] > 0, pattern
        assert row["peak_rss_mb"] > 0 and row["peak_rss_workers_mb"] > 0, pattern
        assert row["client_seconds_mean"] > 0, pattern
        assert f"| sample | {pattern} | 4 | 2 |" in printed
    for pair in ("fedlora / rebuild", "fedlora-bf16 / rebuild"):
        assert f"| sample | 4 | {pair} |" in printed

    with (out / "results.csv").open() as f:
        assert {r["pattern"] for r in csv.DictReader(f)} == set(rows)
    # The server accepted every reply of every ClientApp (same wire format, same checks).
    for pattern in rows:
        run_dir = out / "runs" / f"{pattern}-dp-sample-n4"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["config"]["base-dtype"] == ("bfloat16" if pattern.endswith("-bf16")
                                                   else "float32")
        trained = [r for r in metrics["rounds"] if r["round"] > 0]
        assert [r["clients_accepted"] for r in trained] == [2, 2]
        assert all(r["max_epsilon"] and r["max_epsilon"] > 0 for r in trained)
