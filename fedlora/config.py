"""The run-config: every key, its type, default and accepted range, parsed once.

Run-config keys are kebab-case (``lora-rank``) as Flower passes them; the typed
:class:`RunConfig` has snake_case fields. :func:`parse_run_config` is the only way in:
an unknown key, a wrong type or an out-of-range value raises :class:`ConfigError`
naming the key, the value and what is accepted, before any round starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConfigError", "RunConfig", "KEYS", "parse_run_config", "defaults"]


class ConfigError(ValueError):
    """A run-config key or value is not acceptable."""

    def __init__(self, key: str, value: Any, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"run-config key '{key}' has bad value {value!r}: expected {expected}")


@dataclass(frozen=True)
class Key:
    """One run-config key: its type, default and check (which returns an error text or None)."""

    name: str
    kind: type
    default: Any
    expected: str
    check: Callable[[Any], bool] = lambda v: True
    help: str = ""


def _positive(v: float) -> bool:
    return v > 0


def _choices(*names: str) -> Callable[[Any], bool]:
    return lambda v: v in names


def _modules(v: str) -> bool:
    parts = [p.strip() for p in v.split(",")]
    return bool(v.strip()) and all(parts)


# The single table of run-config keys. Defaults here equal pyproject.toml's
# [tool.flwr.app.config] (a test keeps them in step).
KEYS: tuple[Key, ...] = (
    Key("task", str, "rotten-tomatoes", "one of the registered tasks (see fedlora.tasks)",
        help="Workload: model + data: rotten-tomatoes, news, shakespeare (causal LM), or "
        "custom (reads model-path and data-path)."),
    Key("num-server-rounds", int, 8, "an integer >= 1", lambda v: v >= 1),
    Key("fraction-train", float, 0.2, "a fraction in (0, 1]", lambda v: 0 < v <= 1),
    Key("fraction-evaluate", float, 0.2, "a fraction in [0, 1]", lambda v: 0 <= v <= 1),
    Key("evaluate-every", int, 1, "an integer >= 1", lambda v: v >= 1,
        help="Evaluate (centrally and federated) every this many rounds; the last round "
        "always."),
    Key("min-train-nodes", int, 1, "an integer >= 1", lambda v: v >= 1),
    Key("local-steps", int, 10, "an integer >= 1", lambda v: v >= 1,
        help="Optimiser steps per client per round (used when local-epochs = 0)."),
    Key("local-epochs", int, 0, "an integer >= 0 (0: use local-steps)", lambda v: v >= 0),
    Key("batch-size", int, 32, "an integer in [1, 4096]", lambda v: 1 <= v <= 4096),
    Key("eval-batch-size", int, 128, "an integer in [1, 4096]", lambda v: 1 <= v <= 4096),
    Key("learning-rate", float, 0.002, "a float in (0, 1]", lambda v: 0 < v <= 1),
    Key("weight-decay", float, 0.0, "a float >= 0", lambda v: v >= 0),
    Key("optimizer", str, "adamw", "one of adamw, sgd", _choices("adamw", "sgd"),
        help="Local optimiser: adamw, or sgd with momentum 0.9 (often better under DP-SGD's "
        "noise)."),
    Key("lora-rank", int, 8, "an integer in [1, 1024]", lambda v: 1 <= v <= 1024),
    Key("lora-alpha", float, 16.0, "a float > 0", _positive),
    Key("lora-dropout", float, 0.05, "a float in [0, 1)", lambda v: 0 <= v < 1),
    Key("lora-target-modules", str, "query,value",
        "a comma-separated list of module names, e.g. 'query,value'", _modules),
    Key("train-head", bool, True, "true or false",
        help="Train (and send) the classification head as well as the LoRA factors."),
    Key("head-pooling", str, "auto", "one of auto, mean, model",
        _choices("auto", "mean", "model"),
        help="What the classification head reads: mean (the mean of the token states), model (the model's own head, e.g. "
        "BERT's [CLS] pooler), or auto: under a DP mode, mean for a sentence-transformers "
        "checkpoint trained with mean pooling; else model."),
    Key("probe-rounds", int, 0, "an integer in [0, num-server-rounds]", lambda v: v >= 0,
        help="Linear probing first (LP-FT): in the first this many rounds clients train only "
        "the classification head, by full-batch gradient descent on what the head reads; "
        "LoRA trains in the rounds after. The DP recipe sets it under dp-mode = sample."),
    Key("probe-steps", int, 20, "an integer >= 1", lambda v: v >= 1,
        help="Full-batch gradient steps per client in a probe round."),
    Key("probe-learning-rate", float, 1.0, "a float in (0, 100]", lambda v: 0 < v <= 100,
        help="SGD learning rate of the probe rounds (full-batch steps on a linear head take "
        "a far larger rate than LoRA's)."),
    Key("aggregator", str, "fedavg", "one of the registered aggregators (fedlora.methods)",
        help="How the server combines the clients' factors: fedavg, svd, ffa, stack (see "
        "README; each registered in fedlora.methods)."),
    Key("svd-error-feedback", bool, False, "true or false",
        help="With aggregator = svd: carry the rank-truncation residual into the next round."),
    Key("wire-dtype", str, "float32", "one of float32, float16, bfloat16, int8, int4",
        _choices("float32", "float16", "bfloat16", "int8", "int4"),
        help="Dtype of the adapter tensors in messages, both ways: float16/bfloat16 halve "
        "the bytes; int8/int4 quantise in blocks with a float16 scale each (about 1/4, 1/8)."),
    Key("wire-block-size", int, 64, "an integer in [8, 65536]", lambda v: 8 <= v <= 65536,
        help="int8/int4 wire: values per block (one scale each)."),
    Key("wire-rounding", str, "nearest", "one of nearest, stochastic",
        _choices("nearest", "stochastic"), help="int8/int4 wire: how values are rounded."),
    Key("wire-error-feedback", bool, True, "true or false",
        help="int8/int4 wire: each sender adds what rounding left out to its next message."),
    Key("dp-recipe", str, "auto", "one of auto, none", _choices("auto", "none"),
        help="auto: under a DP mode, keys left at their default take that mode's recipe (for "
        "dp-mode = sample: every client in every round, linear probing first, then "
        "LoRA; see README); none: every key as given."),
    Key("dp-mode", str, "off", "one of the registered DP modes (see fedlora.privacy)",
        help="off; sample: DP-SGD with Opacus on each client; update: clipped, noised "
        "factor updates (DP-LoRA); client: user-level DP-FedAvg at the server (clipped "
        "updates, noised mean); sample+client: both sample and client."),
    Key("target-epsilon", float, 8.0, "a float > 0", _positive,
        help="Privacy budget for the whole run: each client's (sample, update) and the "
        "server's user-level one (client)."),
    Key("target-delta", float, 1e-5, "a float in (0, 1), below 1/n for a client's n examples",
        lambda v: 0 < v < 1),
    Key("max-grad-norm", float, 1.0, "a float > 0", _positive,
        help="Per-example gradient clipping norm (dp-mode = sample)."),
    Key("update-max-norm", float, 1.0, "a float > 0", _positive,
        help="Clipping norm of a client's adapter update (dp-mode = update or client)."),
    Key("accountant", str, "rdp", "one of rdp, prv", _choices("rdp", "prv")),
    Key("max-update-norm", float, 50.0, "a float >= 0 (0: no bound)", lambda v: v >= 0,
        help="Refuse a reply whose change to the adapter (L2 norm over all its tensors) is larger."),
    Key("max-num-examples", int, 10_000_000, "an integer >= 1", lambda v: v >= 1,
        help="Refuse a reply that claims more training examples (it would dominate the average)."),
    Key("foreign-keys", str, "fail", "one of fail, refuse", _choices("fail", "refuse"),
        help="A reply with an array that is not a LoRA factor or the configured head: "
        "fail stops the run naming the key; refuse drops that reply and carries on."),
    Key("max-length", int, 64, "an integer in [8, 4096]", lambda v: 8 <= v <= 4096),
    Key("num-partitions", int, 0, "an integer >= 0 (0: one per SuperNode)", lambda v: v >= 0),
    Key("partitioner", str, "natural", "one of natural, iid, dirichlet",
        _choices("natural", "iid", "dirichlet"),
        help="How the task's pool is split into simulated clients: natural groups (tasks "
        "without groups fall back to iid), iid, or Dirichlet label skew (dirichlet-alpha)."),
    Key("dirichlet-alpha", float, 0.5, "a float > 0", _positive,
        help="Concentration of partitioner = 'dirichlet': small values give each client "
        "few labels, large values approach iid."),
    Key("test-fraction", float, 0.08, "a fraction in (0, 0.5]", lambda v: 0 < v <= 0.5),
    Key("max-test-examples", int, 0, "an integer >= 0 (0: the whole test set)",
        lambda v: v >= 0,
        help="Evaluate centrally on a seeded sample of at most this many test examples "
        "(the task 'shakespeare' defaults to 128)."),
    Key("seed", int, 0, "an integer >= 0", lambda v: v >= 0),
    Key("device", str, "auto", "auto, cpu, cuda or cuda:<index>",
        lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
        help="Where clients and the server run the model: auto is the GPU when torch sees "
        "one (give simulated clients a GPU share with client-resources-num-gpus), else the "
        "CPU."),
    Key("base-dtype", str, "auto", "auto, float32, bfloat16 or float16",
        _choices("auto", "float32", "bfloat16", "float16"),
        help="Precision of the frozen base weights (the adapter, its gradients and the "
        "optimiser stay float32): bfloat16 halves the base model's memory and, on GPUs and "
        "on CPUs with AVX512-BF16 or AMX, speeds up training; auto picks bfloat16 where the "
        "hardware computes it natively. float16 needs a GPU."),
    Key("client-num-threads", int, 0,
        "an integer >= 0 (0: the CPU share the simulation gives each client)", lambda v: v >= 0),
    Key("model-path", str, "", "a local transformers model folder (task 'custom')"),
    Key("data-path", str, "", "a local CSV or JSONL file (task 'custom')"),
    Key("test-data-path", str, "", "a local CSV or JSONL file for centralised evaluation"),
    Key("text-column", str, "text", "a non-empty column name", lambda v: bool(v.strip())),
    Key("label-column", str, "label", "a non-empty column name", lambda v: bool(v.strip())),
    Key("labels", str, "", "comma-separated label names (task 'custom')"),
    Key("output-dir", str, "results", "a non-empty folder path", lambda v: bool(v.strip())),
    Key("run-name", str, "", "a folder name without '/' ('' : a timestamped name)",
        lambda v: "/" not in v and v not in (".", "..")),
    Key("dropout-fraction", float, 0.0, "a fraction in [0, 1)", lambda v: 0 <= v < 1,
        help="Simulation: the share of sampled clients that fail in a round (their ClientApp "
        "raises, as a crashed site would); chosen per round from seed."),
    Key("straggler-fraction", float, 0.0, "a fraction in [0, 1)", lambda v: 0 <= v < 1,
        help="Simulation: the share of sampled clients that reply straggler-delay seconds "
        "late; with a round-timeout below the delay they are dropped."),
    Key("straggler-delay", float, 30.0, "a float >= 0 (seconds)", lambda v: v >= 0),
    Key("resume", bool, False, "true or false",
        help="Continue output-dir/run-name (with run-name '': the newest unfinished run in "
        "output-dir) from its last finished round, using the checkpoint saved every round."),
    Key("round-timeout", float, 0.0, "a float >= 0 (0: wait for every reply)",
        lambda v: v >= 0,
        help="Seconds to wait for the replies of a round; nodes that have not replied by then "
        "are logged as dropped and the round goes on without them. With 0 a node that goes "
        "offline is dropped when it misses its heartbeats (about a minute)."),
)
KEYS_BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}


def _field_name(key: str) -> str:
    return key.replace("-", "_")


def _make_config_class() -> type:
    fields = [(_field_name(k.name), k.kind, field(default=k.default)) for k in KEYS]
    return dataclasses.make_dataclass("RunConfig", fields, frozen=True)


RunConfig = _make_config_class()
RunConfig.__doc__ = "Typed, validated run-config (snake_case fields of the kebab-case keys)."
RunConfig.__module__ = __name__


def _target_modules(self: Any) -> list[str]:
    return [m.strip() for m in self.lora_target_modules.split(",")]


def _label_names(self: Any) -> list[str]:
    return [s.strip() for s in self.labels.split(",") if s.strip()]


def _to_dict(self: Any) -> dict[str, Any]:
    """The config as kebab-case run-config keys (what pyproject.toml holds)."""
    return {k.name: getattr(self, _field_name(k.name)) for k in KEYS}


RunConfig.target_modules = property(_target_modules)
RunConfig.label_names = property(_label_names)
RunConfig.to_dict = _to_dict


def defaults() -> dict[str, Any]:
    """The default value of every key, kebab-case."""
    return {k.name: k.default for k in KEYS}


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
) -> Any:
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
    cfg: Any,
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


def check_paths(cfg: Any) -> None:
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
