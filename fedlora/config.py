"""The run-config, parsed once: coercion, checks across keys and the DP recipe.

Run-config keys are kebab-case (``lora-rank``) as Flower passes them; the typed
:class:`RunConfig` (declared in :mod:`fedlora.run_config`, one field per key with its
default, accepted values and help) has snake_case fields. :func:`parse_run_config` is the
only way in: an unknown key, a wrong type or an out-of-range value raises
:class:`ConfigError` naming the key, the value and what is accepted, before any round
starts.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

from .run_config import KEYS, KEYS_BY_NAME, Key, RunConfig, defaults
from .run_config import field_name as _field_name

__all__ = ["ConfigError", "RunConfig", "KEYS", "parse_run_config", "defaults"]


class ConfigError(ValueError):
    """A run-config key or value is not acceptable."""

    def __init__(self, key: str, value: Any, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"run-config key '{key}' has bad value {value!r}: expected {expected}")


def _coerce(key: Key, value: Any) -> Any:
    """Convert a run-config value to the key's type, or raise ConfigError."""
    kind = key.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ConfigError(key.name, value, key.expected)
    if kind is int:
        integral = isinstance(value, float) and value.is_integer()
        if (isinstance(value, int) and not isinstance(value, bool)) or integral:
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(key.name, value, key.expected)
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(key.name, value, key.expected)
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise ConfigError(key.name, value, key.expected) from None
        else:
            raise ConfigError(key.name, value, key.expected)
        if not math.isfinite(out):
            raise ConfigError(key.name, value, key.expected)
        return out
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key.name, value, key.expected)
    raise TypeError(f"unsupported key type {kind}")  # pragma: no cover


def parse_run_config(
    run_config: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    known_tasks: Mapping[str, Any] | None = None,
    known_aggregators: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Parse Flower's run-config (plus optional overrides) into a :class:`RunConfig`.

    Raises :class:`ConfigError` for an unknown key (with the closest known key
    suggested), a wrong type, an out-of-range value or an incompatible combination.
    """
    merged: dict[str, Any] = {}
    for source in (run_config or {}, overrides or {}):
        merged.update(source)
    values: dict[str, Any] = {}
    for name, raw in merged.items():
        key = KEYS_BY_NAME.get(name)
        if key is None:
            close = difflib.get_close_matches(name, KEYS_BY_NAME, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(name, raw, f"a known key (unknown key{hint})")
        value = _coerce(key, raw)
        if not key.check(value):
            raise ConfigError(name, raw, key.expected)
        values[_field_name(name)] = value
    _apply_task_defaults(values, known_tasks)
    for name, value in dp_recipe(values).items():
        values[_field_name(name)] = _coerce(KEYS_BY_NAME[name], value)
    cfg = RunConfig(**values)
    _check_combinations(cfg, known_tasks, known_aggregators)
    return cfg


def _apply_task_defaults(values: dict[str, Any], known_tasks: Mapping[str, Any] | None) -> None:
    """Give keys left at their global default the task's own default (``config_defaults``
    of :class:`fedlora.tasks.Task`), e.g. the LoRA target modules of its model.

    Flower passes every key of pyproject.toml, so "left at the default" means "equal to
    the global default": a task default replaces exactly that value, any other is kept.
    """
    task = (known_tasks or {}).get(values.get("task", KEYS_BY_NAME["task"].default))
    for name, raw in dict(getattr(task, "config_defaults", None) or {}).items():
        key = KEYS_BY_NAME[name]
        if values.get(_field_name(name), key.default) == key.default:
            value = _coerce(key, raw)
            if not key.check(value):
                raise ConfigError(name, raw, key.expected)
            values[_field_name(name)] = value


def dp_recipe(values: Mapping[str, Any]) -> dict[str, Any]:
    """The keys (kebab-case) that the DP recipe of ``values``' dp-mode changes, with their
    recipe values: only keys left at their global default, and only with dp-recipe = auto."""
    get = lambda name: values.get(_field_name(name), KEYS_BY_NAME[name].default)  # noqa: E731
    if get("dp-recipe") != "auto" or get("dp-mode") == "off":
        return {}
    from .privacy import parse_dp_mode  # each DP mechanism owns its recipe

    try:
        mechanisms = parse_dp_mode(get("dp-mode"))
    except ConfigError:
        return {}  # reported by the DP checks, naming the key
    kebab = {k.name: get(k.name) for k in KEYS}
    out: dict[str, Any] = {}
    for mechanism in mechanisms:
        for name, value in mechanism.recipe(kebab).items():
            if get(name) == KEYS_BY_NAME[name].default:
                out[name] = value
    return out


def _check_combinations(
    cfg: RunConfig,
    known_tasks: Mapping[str, Any] | None,
    known_aggregators: Mapping[str, Any] | None,
) -> None:
    if known_tasks is not None and cfg.task not in known_tasks:
        raise ConfigError("task", cfg.task, f"one of {', '.join(sorted(known_tasks))}")
    if known_aggregators is not None and cfg.aggregator not in known_aggregators:
        raise ConfigError(
            "aggregator", cfg.aggregator, f"one of {', '.join(sorted(known_aggregators))}"
        )
    if cfg.svd_error_feedback and cfg.aggregator != "svd":
        raise ConfigError("svd-error-feedback", cfg.svd_error_feedback,
                          f"false unless aggregator = 'svd' (aggregator is '{cfg.aggregator}')")
    if cfg.probe_rounds > cfg.num_server_rounds:
        raise ConfigError("probe-rounds", cfg.probe_rounds,
                          f"at most num-server-rounds ({cfg.num_server_rounds})")
    if cfg.probe_rounds and not cfg.train_head:
        raise ConfigError("probe-rounds", cfg.probe_rounds,
                          "0 when train-head is false (a probe round trains the head alone)")
    from .privacy import check_dp_config  # each DP mechanism owns its checks

    check_dp_config(cfg)
    from .secure_sum import check_config as check_secure_aggregation

    check_secure_aggregation(cfg)
    task_check = getattr((known_tasks or {}).get(cfg.task), "check_config", None)
    if task_check is not None:
        task_check(cfg)
    if cfg.task == "custom":
        if not cfg.model_path:
            raise ConfigError("model-path", cfg.model_path,
                              "a local transformers model folder when task = 'custom'")
        if len(cfg.label_names) < 2:
            raise ConfigError("labels", cfg.labels,
                              "at least two comma-separated label names when task = 'custom'")
        if len(set(cfg.label_names)) != len(cfg.label_names):
            raise ConfigError("labels", cfg.labels, "distinct label names")


def check_paths(cfg: RunConfig) -> None:
    """Check that the local paths named in the run-config exist (server side, before round 1).

    A site's own ``data-path`` from its node-config is checked by that site's ClientApp.
    """
    from pathlib import Path

    if cfg.model_path:
        p = Path(cfg.model_path).expanduser()
        if not (p / "config.json").is_file():
            raise ConfigError("model-path", cfg.model_path,
                              "an existing transformers model folder (with config.json)")
    for name in ("data-path", "test-data-path"):
        value = getattr(cfg, _field_name(name))
        if value and not Path(value).expanduser().is_file():
            raise ConfigError(name, value, "an existing CSV or JSONL file")
