"""The sweep commands in simulations/ run end to end (tiny model, one round)."""

from __future__ import annotations

import json

import pytest

from simulations import compare_aggregators, sweep_epsilon


def _sets(task: dict) -> list[str]:
    keep = {k: v for k, v in task.items() if k not in ("run-name", "output-dir",
                                                       "num-server-rounds", "num-partitions")}
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in keep.items()]


@pytest.mark.slow
def test_epsilon_sweep_writes_table_and_plot(custom_task, tmp_path):
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


@pytest.mark.slow
def test_aggregator_comparison_writes_a_table(custom_task, tmp_path):
    out = tmp_path / "cmp"
    argv = ["--aggregators", "fedavg,svd", "--rounds", "1", "--clients", "4", "--out", str(out),
            "--no-het"] + sum((["--set", s] for s in _sets(custom_task)), [])
    assert compare_aggregators.main(argv) == 0
    rows = json.loads((out / "table.json").read_text())
    assert [r["aggregator"] for r in rows] == ["fedavg", "svd"]
    assert all(r["bytes_up"] > 0 for r in rows)


@pytest.mark.slow
def test_poisoning_comparison_refuses_only_with_checks_on(custom_task, tmp_path):
    from simulations import poisoning

    out = tmp_path / "poison"
    argv = ["--rounds", "1", "--clients", "4", "--out", str(out)] + sum(
        (["--set", s] for s in _sets(custom_task)), [])
    assert poisoning.main(argv) == 0
    rows = json.loads((out / "table.json").read_text())
    assert [r["refused_replies"] for r in rows] == [0, 1, 0]


def _run(method, eps, acc, delta=1e-5):
    return {"method": method, "target_epsilon": eps, "test_accuracy": acc, "delta": delta,
            "noise_multiplier": None if eps is None else 7.0,
            "epsilon_spent": None if eps is None else eps - 0.01, "seconds": 10.0}


def test_repeated_runs_are_summarised_with_their_spread_and_the_lora_probe_difference():
    rows = [_run("lora", 8.0, a) for a in (0.78, 0.79, 0.785)]
    rows += [_run("probe", 8.0, a) for a in (0.789, 0.787)] + [_run("no DP", None, 0.82)]
    groups = sweep_epsilon.summarise(rows)
    lora = groups[0]
    assert (lora["method"], len(lora["accuracies"])) == ("lora", 3)
    assert abs(lora["mean"] - 0.785) < 1e-12 and abs(lora["sd"] - 0.005) < 1e-12
    assert groups[2]["sd"] is None  # one run has no spread
    (diff,) = sweep_epsilon.lora_minus_probe(groups)
    assert abs(diff["difference"] - (0.785 - 0.788)) < 1e-12
    assert abs(diff["standard_error"] - (0.005 ** 2 / 3 + 0.0014142 ** 2 / 2) ** 0.5) < 1e-6
    text = sweep_epsilon.table(rows, 0.64)
    assert "| lora | 8 | 3 | 7.0000 | 7.990 | 0.7850 ± 0.0050 | 0.7800, 0.7900, 0.7850 |" in text
    assert "| 8 | -0.30 | 0.31 |" in text


def test_an_earlier_sweep_counts_as_repeats_and_a_different_delta_is_refused(tmp_path):
    import pytest

    def sweep(name, rows):
        d = tmp_path / name
        d.mkdir()
        (d / "table.json").write_text(json.dumps({"rows": rows, "majority": 0.64}))
        return d

    out = sweep("now", [_run("lora", 8.0, 0.78), _run("probe", 8.0, 0.79)])
    before = sweep("before", [_run("lora", 8.0, 0.80), _run("probe", 8.0, 0.77)])
    assert sweep_epsilon.main(["--replot", "--out", str(out), "--add", str(before)]) == 0
    text = (out / "table.md").read_text()
    assert "| lora | 8 | 2 |" in text and "0.7800, 0.8000" in text  # this sweep's, then --add's
    assert (out / "accuracy_vs_epsilon.png").read_bytes()[:4] == b"\x89PNG"
    other = sweep("other", [_run("lora", 8.0, 0.80, delta=1e-3)])
    with pytest.raises(SystemExit, match="delta"):
        sweep_epsilon.main(["--replot", "--out", str(out), "--add", str(other)])
    with pytest.raises(SystemExit, match="--repeats"):
        sweep_epsilon.main(["--repeats", "0", "--out", str(out)])


def test_dp_signal_reports_clipped_signal_against_the_plans_noise(custom_task):
    import math

    from simulations import dp_signal

    keep = {k: v for k, v in custom_task.items() if k not in ("run-name", "output-dir")}
    result = dp_signal.measure({**keep, "target-epsilon": 8.0, "target-delta": 1e-3},
                               clients=4, probe_steps=5, max_examples=12, progress=lambda m: 0)
    groups = {g["group"]: g for g in result["groups"]}
    assert set(groups) == {"head", "LoRA A", "LoRA B"}
    assert groups["LoRA A"]["signal"] == 0.0  # B starts at zero: A has no gradient yet
    assert groups["LoRA B"]["signal"] > 0 and groups["head"]["signal"] > 0
    sigma, n = result["noise_multiplier"], result["examples"]
    assert sigma > 0 and n == 50  # 200 rows over 4 partitions, all training under DP
    for g in groups.values():
        assert math.isclose(g["noise_one_client"], sigma * math.sqrt(g["dimensions"]) / n)
        assert math.isclose(g["noise_mean_of_clients"], g["noise_one_client"] / 2)
        # distributed DP: the noise once on the sum of 4 clients' steps, sqrt(4) less again
        assert math.isclose(g["noise_distributed"], g["noise_one_client"] / 4)
    # Every example's joint gradient is clipped to C before the mean: with a tiny C the
    # signal of all groups together cannot exceed it, whatever the raw norms are.
    tiny = dp_signal.measure({**keep, "target-epsilon": 8.0, "target-delta": 1e-3,
                              "max-grad-norm": 1e-4}, clients=4, probe_steps=0,
                             max_examples=12, progress=lambda m: 0)
    joint = math.sqrt(sum(g["signal"] ** 2 for g in tiny["groups"]))
    assert joint <= 1e-4 * (1 + 1e-5)
    assert max(g["median_example_norm"] for g in tiny["groups"]) > 1e-3
    assert "| LoRA B |" in dp_signal.table(result)


@pytest.mark.parametrize("family, groups", [
    ("vera", {"head", "VeRA lambda_b", "VeRA lambda_d"}),
    ("dora", {"head", "LoRA A", "LoRA B", "DoRA magnitude"}),
    ("c3a", {"head", "C3A kernel"}),
])
def test_dp_signal_shows_what_dp_sgd_would_face_on_each_family(custom_task, family, groups):
    """DP-SGD refuses these families (Opacus cannot take their per-example gradients); the
    diagnostic takes them itself, with the plan's sigma as for LoRA."""
    import math

    from simulations import dp_signal

    keep = {k: v for k, v in custom_task.items() if k not in ("run-name", "output-dir")}
    common = {**keep, "target-epsilon": 8.0, "target-delta": 1e-3}
    lora = dp_signal.measure(common, clients=4, probe_steps=0, max_examples=4,
                             progress=lambda m: 0)
    extra = {"c3a-block-size": 8} if family == "c3a" else {}
    result = dp_signal.measure({**common, "adapter": family, **extra}, clients=4,
                               probe_steps=0, max_examples=4, progress=lambda m: 0)
    assert result["noise_multiplier"] == lora["noise_multiplier"]  # the same plan
    got = {g["group"]: g for g in result["groups"]}
    assert set(got) == groups
    assert all(g["dimensions"] > 0 and math.isfinite(g["signal"]) for g in got.values())
    assert sum(g["signal"] for g in got.values() if g["group"] != "head") > 0
    assert got["head"]["dimensions"] == {g["group"]: g for g in lora["groups"]}["head"][
        "dimensions"]
