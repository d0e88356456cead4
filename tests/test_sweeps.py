"""The sweep commands in simulations/ run end to end (tiny model, one round)."""

from __future__ import annotations

import json

from simulations import compare_aggregators, sweep_epsilon

from .test_simulation import custom_task  # noqa: F401  (fixture)


def _sets(task: dict) -> list[str]:
    keep = {k: v for k, v in task.items() if k not in ("run-name", "output-dir",
                                                       "num-server-rounds", "num-partitions")}
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in keep.items()]


def test_epsilon_sweep_writes_table_and_plot(custom_task, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    argv = ["--epsilons", "8", "--rounds", "2", "--clients", "4", "--delta", "1e-3",
            "--out", str(out)] + sum((["--set", s] for s in _sets(custom_task)), [])
    assert sweep_epsilon.main(argv) == 0
    saved = json.loads((out / "table.json").read_text())
    rows = saved["rows"]
    assert [(r["method"], r["target_epsilon"]) for r in rows] == [
        ("lora", 8.0), ("probe", 8.0), ("no DP", None)]
    for r in rows[:2]:
        assert r["noise_multiplier"] > 0 and r["epsilon_spent"] <= 8.0
    assert 0.5 <= saved["majority"] <= 1.0
    assert (out / "accuracy_vs_epsilon.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "table.md").read_text()
    assert "| no DP |" in text and "| probe | 8 |" in text and "| majority class |" in text


def test_aggregator_comparison_writes_a_table(custom_task, tmp_path):  # noqa: F811
    out = tmp_path / "cmp"
    argv = ["--aggregators", "fedavg,svd", "--rounds", "1", "--clients", "4", "--out", str(out),
            "--no-het"] + sum((["--set", s] for s in _sets(custom_task)), [])
    assert compare_aggregators.main(argv) == 0
    rows = json.loads((out / "table.json").read_text())
    assert [r["aggregator"] for r in rows] == ["fedavg", "svd"]
    assert all(r["bytes_up"] > 0 for r in rows)


def test_poisoning_comparison_refuses_only_with_checks_on(custom_task, tmp_path):  # noqa: F811
    from simulations import poisoning

    out = tmp_path / "poison"
    argv = ["--rounds", "1", "--clients", "4", "--out", str(out)] + sum(
        (["--set", s] for s in _sets(custom_task)), [])
    assert poisoning.main(argv) == 0
    rows = json.loads((out / "table.json").read_text())
    assert [r["refused_replies"] for r in rows] == [0, 1, 0]
