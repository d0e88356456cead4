"""Run-config parsing: types, ranges, unknown keys, and the pyproject defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedlora import aggregation
from fedlora.config import KEYS, ConfigError, check_paths, defaults
from fedlora.runtime import parse_run_config, resolve_config
from fedlora.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_the_key_table():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == defaults()


def test_defaults_parse_and_are_typed():
    cfg = parse_run_config({})
    assert cfg.lora_rank == 8 and isinstance(cfg.learning_rate, float)
    assert cfg.target_modules == ["query", "value"]
    assert cfg.to_dict() == defaults()


def test_values_are_coerced_from_cli_strings():
    cfg = parse_run_config({"lora-rank": "4", "train-head": "false", "learning-rate": "1e-3",
                            "num-server-rounds": 2.0})
    assert (cfg.lora_rank, cfg.train_head, cfg.learning_rate, cfg.num_server_rounds) == (
        4, False, 1e-3, 2)


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("lora-rank", 0, "lora-rank"),
        ("lora-rank", -3, "lora-rank"),
        ("lora-rank", 2.5, "lora-rank"),
        ("fraction-train", 0.0, "(0, 1]"),
        ("fraction-train", 1.5, "(0, 1]"),
        ("learning-rate", "fast", "learning-rate"),
        ("learning-rate", float("nan"), "learning-rate"),
        ("train-head", "maybe", "true or false"),
        ("lora-target-modules", "query,,value", "comma-separated"),
        ("batch-size", True, "batch-size"),
        ("wire-dtype", "int2", "int4"),
        ("wire-block-size", 4, "[8, 65536]"),
        ("wire-block-size", "big", "wire-block-size"),
        ("wire-rounding", "up", "stochastic"),
        ("run-name", "a/b", "run-name"),
    ],
)
def test_bad_values_name_key_and_value(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value})
    msg = str(err.value)
    assert f"'{key}'" in msg and repr(value) in msg and fragment in msg


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"'lora-rnak'.*did you mean 'lora-rank'"):
        parse_run_config({"lora-rnak": 4})


def test_unknown_task_and_aggregator_list_the_known_ones():
    with pytest.raises(ConfigError, match="rotten-tomatoes"):
        parse_run_config({"task": "nope"}, known_tasks=TASKS)
    with pytest.raises(ConfigError, match="fedavg"):
        parse_run_config({"aggregator": "mean-of-everything"},
                         known_aggregators=dict.fromkeys(aggregation.available_methods()))


def test_custom_task_needs_model_path_and_labels(tmp_path):
    with pytest.raises(ConfigError, match="model-path"):
        parse_run_config({"task": "custom", "labels": "a,b"})
    with pytest.raises(ConfigError, match="labels"):
        parse_run_config({"task": "custom", "model-path": str(tmp_path), "labels": "a"})


def test_missing_paths_are_refused_before_the_run(tmp_path, tiny_model_dir):
    cfg = parse_run_config({"task": "custom", "model-path": str(tmp_path / "no-model"),
                            "labels": "a,b"})
    with pytest.raises(ConfigError, match="model-path"):
        check_paths(cfg)
    cfg = parse_run_config({"task": "custom", "model-path": str(tiny_model_dir), "labels": "a,b",
                            "data-path": str(tmp_path / "missing.csv")})
    with pytest.raises(ConfigError, match=r"'data-path'.*missing\.csv"):
        check_paths(cfg)


def test_resolve_config_checks_registered_names():
    assert resolve_config({}).aggregator == "fedavg"
    with pytest.raises(ConfigError, match="aggregator"):
        resolve_config({"aggregator": "bogus"})


def test_every_key_has_a_type_and_an_expected_text():
    for key in KEYS:
        assert key.expected and key.kind in (int, float, str, bool)
        assert key.check(key.default), key.name


@pytest.mark.parametrize("config,key", [
    ({"svd-error-feedback": True, "aggregator": "fedavg"}, "svd-error-feedback"),
    ({"dp-mode": "sample", "local-epochs": 1}, "local-epochs"),
])
def test_incompatible_combinations_name_the_key(config, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_run_config(config)
