"""The virtual-client benchmark's smoke path: both ClientApps train through the simulation
engine, and the table and result files report positive throughput and memory.

No timing is asserted: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import csv
import json
import math

import pytest

from .conftest import write_reviews


@pytest.mark.slow
def test_quick_run_reports_both_patterns(tmp_path, tiny_model_dir, capsys):
    from fedlora.models import _cpu_has_fast_bf16
    from simulations import bench_clients
    from simulations.bench_clients.configs import default_patterns

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
    # fedlora-bf16 only where this CPU multiplies bfloat16 natively: never an emulated one
    expected = set(default_patterns())
    assert expected == ({"fedlora", "fedlora-bf16", "rebuild"} if _cpu_has_fast_bf16()
                        else {"fedlora", "rebuild"})
    assert set(rows) == expected
    for pattern, row in rows.items():
        assert row["nodes"] == 4
        assert row["timed_updates"] == 2, pattern  # round 2 only: 2 clients
        assert row["all_updates"] == 4, pattern
        assert row["updates_per_s"] > 0, pattern
        assert row["peak_rss_mb"] > 0 and row["peak_rss_workers_mb"] > 0, pattern
        assert row["client_seconds_mean"] > 0, pattern
        assert f"| sample | {pattern} | 4 | 2 |" in printed
    for pattern in sorted(expected - {"rebuild"}):
        assert f"| sample | 4 | {pattern} / rebuild |" in printed

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


def test_gpu_readings_are_parsed_and_kept_to_the_timed_rounds():
    from simulations.bench_clients.sampling import _timed_utilisation, parse_nvidia_smi
    from simulations.bench_clients.summary import format_report

    assert parse_nvidia_smi("87, 30211\n45, 1000\n") == (66.0, 31211.0)
    assert parse_nvidia_smi("") is None
    assert parse_nvidia_smi("[N/A], [N/A]\nNo devices were found\n") is None
    rounds = [{"started": 10.0, "ended": 20.0}, {"started": 30.0, "ended": 40.0}]
    readings = [(5.0, 0.0), (12.0, 80.0), (25.0, 0.0), (35.0, 60.0), (45.0, 0.0)]
    assert _timed_utilisation(readings, rounds) == 70.0
    assert math.isnan(_timed_utilisation([], rounds))
    row = {"dp_mode": "off", "pattern": "fedlora", "nodes": 100, "timed_updates": 300,
           "timed_seconds": 10.0, "updates_per_s": 30.0, "updates_per_s_all_rounds": 25.0,
           "client_seconds_mean": 0.5, "peak_rss_mb": 9000.0, "peak_rss_workers_mb": 8000.0,
           "gpu_utilisation_pct": 70.0, "peak_gpu_memory_mb": 31211.0}
    report = format_report([row], [100])
    assert "GPU utilisation" in report and "| 70% | 31211 |" in report
    cpu_only = format_report([{**row, "gpu_utilisation_pct": float("nan"),
                               "peak_gpu_memory_mb": float("nan")}], [100])
    assert "GPU" not in cpu_only


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_share_without_a_gpu_is_refused(tmp_path):
    from simulations import bench_clients

    with pytest.raises(SystemExit, match="--gpus-per-client 0.1: torch .* sees no GPU"):
        bench_clients.main(["--quick", "--gpus-per-client", "0.1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="must be in \\[0, 1\\]"):
        bench_clients.main(["--quick", "--gpus-per-client", "2", "--out", str(tmp_path)])


@pytest.mark.slow
def test_the_rebuild_baseline_runs_a_causal_lm(tmp_path):
    """Both ClientApps train the shakespeare task (here on a tiny random Llama) through the
    simulation engine, so the benchmark can compare them on a causal LM too."""
    from simulations import bench_clients
    from tests.test_shakespeare import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny-llama")
    out = tmp_path / "bench"
    rc = bench_clients.main([
        "--quick", "--nodes", "4", "--per-round", "2", "--rounds", "2", "--partitions", "4",
        "--patterns", "fedlora,rebuild", "--dp", "off", "--out", str(out),
        "--set", "task=shakespeare", "--set", f"model-path={json.dumps(str(model))}",
        "--set", "max-length=16", "--set", "max-test-examples=8", "--set", "lora-rank=4",
        "--set", "lora-alpha=8.0",
    ])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["pattern"] for r in rows} == {"fedlora", "rebuild"}
    for pattern in ("fedlora", "rebuild"):
        metrics = json.loads((out / "runs" / f"{pattern}-dp-off-n4" / "metrics.json").read_text())
        trained = [r for r in metrics["rounds"] if r["round"] > 0]
        assert [r["clients_accepted"] for r in trained] == [2, 2]
        assert all(math.isfinite(r["test_perplexity"]) for r in trained)
