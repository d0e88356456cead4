"""The run-config's keys, declared once as the fields of :class:`RunConfig`.

Each field is one run-config key: its kebab-case name is the field's name with ``-`` for
``_`` (``lora_rank`` is ``lora-rank``), its type is the annotation, and its default,
accepted values (``expected``, the text errors quote), check and help text are in the
field's metadata (:func:`key`), as peft declares its configs. :data:`KEYS` lists them in
that order. Defaults equal pyproject.toml's ``[tool.flwr.app.config]`` (a test keeps them
in step). Parsing and the checks across keys are :mod:`fedlora.config`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KEYS", "KEYS_BY_NAME", "Key", "RunConfig", "defaults", "field_name", "key"]


@dataclass(frozen=True)
class Key:
    """One run-config key: its type, default and check (True when a value is accepted)."""

    name: str
    kind: type
    default: Any
    expected: str
    check: Callable[[Any], bool] = lambda v: True
    help: str = ""


def key(default: Any, expected: str, check: Callable[[Any], bool] = lambda v: True, *,
        help: str = "") -> Any:
    """A :class:`RunConfig` field: its default, with the rest of its :class:`Key` as metadata."""
    return field(default=default, metadata={"expected": expected, "check": check, "help": help})


def _positive(v: float) -> bool:
    return v > 0


def _choices(*names: str) -> Callable[[Any], bool]:
    return lambda v: v in names


def _modules(v: str) -> bool:
    parts = [p.strip() for p in v.split(",")]
    return bool(v.strip()) and all(parts)


@dataclass(frozen=True)
class RunConfig:
    """Typed, validated run-config (snake_case fields of the kebab-case keys); build it with
    :func:`fedlora.config.parse_run_config`."""

    task: str = key(
        "rotten-tomatoes", "one of the registered tasks (see fedlora.tasks)",
        help="Workload: model + data: rotten-tomatoes, news, shakespeare (causal LM), or "
        "custom (reads model-path and data-path).")
    num_server_rounds: int = key(8, "an integer >= 1", lambda v: v >= 1)
    fraction_train: float = key(0.2, "a fraction in (0, 1]", lambda v: 0 < v <= 1)
    fraction_evaluate: float = key(0.2, "a fraction in [0, 1]", lambda v: 0 <= v <= 1)
    evaluate_every: int = key(
        1, "an integer >= 1", lambda v: v >= 1,
        help="Evaluate (centrally and federated) every this many rounds; the last round "
        "always.")
    min_train_nodes: int = key(1, "an integer >= 1", lambda v: v >= 1)
    local_steps: int = key(
        10, "an integer >= 1", lambda v: v >= 1,
        help="Optimiser steps per client per round (used when local-epochs = 0).")
    local_epochs: int = key(0, "an integer >= 0 (0: use local-steps)", lambda v: v >= 0)
    batch_size: int = key(32, "an integer in [1, 4096]", lambda v: 1 <= v <= 4096)
    eval_batch_size: int = key(128, "an integer in [1, 4096]", lambda v: 1 <= v <= 4096)
    max_physical_batch_size: int = key(
        64, "an integer in [1, 4096]", lambda v: 1 <= v <= 4096,
        help="Under dp-mode = sample, the most examples one forward/backward pass holds: a "
             "larger Poisson batch is taken in chunks (one noisy step per logical batch).")
    learning_rate: float = key(0.002, "a float in (0, 1]", lambda v: 0 < v <= 1)
    weight_decay: float = key(0.0, "a float >= 0", lambda v: v >= 0)
    optimizer: str = key(
        "adamw", "one of adamw, sgd", _choices("adamw", "sgd"),
        help="Local optimiser: adamw, or sgd with momentum 0.9 (often better under DP-SGD's "
        "noise).")
    lora_rank: int = key(8, "an integer in [1, 1024]", lambda v: 1 <= v <= 1024)
    lora_alpha: float = key(16.0, "a float > 0", _positive)
    lora_dropout: float = key(0.05, "a float in [0, 1)", lambda v: 0 <= v < 1)
    lora_target_modules: str = key(
        "query,value", "a comma-separated list of module names, e.g. 'query,value'", _modules)
    adapter: str = key(
        "lora", "one of the registered adapter families (see fedlora.adapter_families)",
        help="The adapter family: lora, dora (LoRA plus a magnitude per output row), vera "
        "(two vectors per layer on shared random matrices drawn from seed) or c3a (a "
        "block-circulant kernel per layer, linear in what is sent); see "
        "docs/adapters.md for what each sends and which aggregators take it.")
    c3a_block_size: int = key(
        64, "an integer in [1, 65536] dividing the input and output widths of every adapted "
        "layer", lambda v: 1 <= v <= 65536,
        help="With adapter = c3a: the size of the circulant blocks; a layer sends "
        "d_out * d_in / c3a-block-size numbers.")
    lora_init: str = key(
        "default", "one of default, gaussian, pissa, olora",
        _choices("default", "gaussian", "pissa", "olora"),
        help="How LoRA's factors start: default (peft's Kaiming-uniform A, zero B), gaussian "
        "(A Gaussian, B zero), or derived from the base weights at every party: pissa (top "
        "singular directions) or olora (QR); these two move that part out of the frozen base.")
    train_head: bool = key(
        True, "true or false",
        help="Train (and send) the classification head as well as the LoRA factors.")
    head_pooling: str = key(
        "auto", "one of auto, mean, model", _choices("auto", "mean", "model"),
        help="What the classification head reads: mean (the mean of the token states), model (the model's own head, e.g. "
        "BERT's [CLS] pooler), or auto: under a DP mode, mean for a sentence-transformers "
        "checkpoint trained with mean pooling; else model.")
    probe_rounds: int = key(
        0, "an integer in [0, num-server-rounds]", lambda v: v >= 0,
        help="Linear probing first (LP-FT): in the first this many rounds clients train only "
        "the classification head, by full-batch gradient descent on what the head reads; "
        "LoRA trains in the rounds after. The DP recipe sets it under dp-mode = sample.")
    probe_steps: int = key(
        20, "an integer >= 1", lambda v: v >= 1,
        help="Full-batch gradient steps per client in a probe round.")
    probe_learning_rate: float = key(
        1.0, "a float in (0, 100]", lambda v: 0 < v <= 100,
        help="SGD learning rate of the probe rounds (full-batch steps on a linear head take "
        "a far larger rate than LoRA's).")
    aggregator: str = key(
        "fedavg", "one of the registered aggregators (fedlora.aggregation)",
        help="How the server combines the clients' factors: fedavg, svd, ffa, stack, fedsa (see "
        "docs/aggregators.md; each registered in fedlora.aggregation).")
    svd_error_feedback: bool = key(
        False, "true or false",
        help="With aggregator = svd: carry the rank-truncation residual into the next round.")
    wire_dtype: str = key(
        "float32", "one of float32, float16, bfloat16, int8, int4",
        _choices("float32", "float16", "bfloat16", "int8", "int4"),
        help="Dtype of the adapter tensors in messages, both ways: float16/bfloat16 halve "
        "the bytes; int8/int4 quantise in blocks with a float16 scale each (about 1/4, 1/8).")
    wire_block_size: int = key(
        64, "an integer in [8, 65536]", lambda v: 8 <= v <= 65536,
        help="int8/int4 wire: values per block (one scale each).")
    wire_rounding: str = key(
        "nearest", "one of nearest, stochastic", _choices("nearest", "stochastic"),
        help="int8/int4 wire: how values are rounded.")
    wire_error_feedback: bool = key(
        True, "true or false",
        help="int8/int4 wire: each sender adds what rounding left out to its next message.")
    dp_recipe: str = key(
        "auto", "one of auto, none", _choices("auto", "none"),
        help="auto: under a DP mode, keys left at their default take that mode's recipe (for "
        "dp-mode = sample: every client in every round, linear probing first, then "
        "LoRA; see docs/privacy.md); none: every key as given.")
    dp_mode: str = key(
        "off", "one of the registered DP modes (see fedlora.privacy)",
        help="off; sample: DP-SGD with Opacus on each client; update: clipped, noised "
        "factor updates (DP-LoRA); client: user-level DP-FedAvg at the server (clipped "
        "updates, noised mean); sample+client: both sample and client.")
    target_epsilon: float = key(
        8.0, "a float > 0", _positive,
        help="Privacy budget for the whole run: each client's (sample, update) and the "
        "server's user-level one (client).")
    target_delta: float = key(
        1e-5, "a float in (0, 1), below 1/n for a client's n examples", lambda v: 0 < v < 1)
    max_grad_norm: float = key(
        1.0, "a float > 0", _positive,
        help="Per-example gradient clipping norm (dp-mode = sample).")
    update_max_norm: float = key(
        1.0, "a float > 0", _positive,
        help="Clipping norm of a client's adapter update (dp-mode = update or client).")
    accountant: str = key("rdp", "one of rdp, prv", _choices("rdp", "prv"))
    max_update_norm: float = key(
        50.0, "a float >= 0 (0: no bound)", lambda v: v >= 0,
        help="Refuse a reply whose change to the adapter (L2 norm over all its tensors) is larger.")
    max_num_examples: int = key(
        10_000_000, "an integer >= 1", lambda v: v >= 1,
        help="Refuse a reply that claims more training examples (it would dominate the average).")
    foreign_keys: str = key(
        "fail", "one of fail, refuse", _choices("fail", "refuse"),
        help="A reply with an array that is not a LoRA factor or the configured head: "
        "fail stops the run naming the key; refuse drops that reply and carries on.")
    max_length: int = key(64, "an integer in [8, 4096]", lambda v: 8 <= v <= 4096)
    num_partitions: int = key(0, "an integer >= 0 (0: one per SuperNode)", lambda v: v >= 0)
    partitioner: str = key(
        "natural", "one of natural, iid, dirichlet", _choices("natural", "iid", "dirichlet"),
        help="How the task's pool is split into simulated clients: natural groups (tasks "
        "without groups fall back to iid), iid, or Dirichlet label skew (dirichlet-alpha).")
    dirichlet_alpha: float = key(
        0.5, "a float > 0", _positive,
        help="Concentration of partitioner = 'dirichlet': small values give each client "
        "few labels, large values approach iid.")
    test_fraction: float = key(0.08, "a fraction in (0, 0.5]", lambda v: 0 < v <= 0.5)
    max_test_examples: int = key(
        0, "an integer >= 0 (0: the whole test set)", lambda v: v >= 0,
        help="Evaluate centrally on a seeded sample of at most this many test examples "
        "(the task 'shakespeare' defaults to 128).")
    seed: int = key(0, "an integer >= 0", lambda v: v >= 0)
    device: str = key(
        "auto", "auto, cpu, cuda or cuda:<index>",
        lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
        help="Where clients and the server run the model: auto is the GPU when torch sees "
        "one (give simulated clients a GPU share with client-resources-num-gpus), else the "
        "CPU.")
    base_dtype: str = key(
        "auto", "auto, float32, bfloat16 or float16",
        _choices("auto", "float32", "bfloat16", "float16"),
        help="Precision of the frozen base weights (the adapter, its gradients and the "
        "optimiser stay float32): bfloat16 halves the base model's memory and, on GPUs and "
        "on CPUs with AVX512-BF16 or AMX, speeds up training; auto picks bfloat16 where the "
        "hardware computes it natively. float16 needs a GPU.")
    base_quant: str = key(
        "none", "one of none, int8, nf4", _choices("none", "int8", "nf4"),
        help="Quantise the sites' frozen base: int8 (LLM.int8()) or nf4 (4-bit NormalFloat, as "
        "in QLoRA), with bitsandbytes (the 'quant' extra); LoRA and the head still train, and "
        "are sent, in float32. The server evaluates on the unquantised base. Takes adapter = "
        "lora only (docs/adapters.md).")
    client_num_threads: int = key(
        0, "an integer >= 0 (0: the CPU share the simulation gives each client)",
        lambda v: v >= 0)
    model_path: str = key("", "a local transformers model folder (task 'custom')")
    data_path: str = key("", "a local CSV or JSONL file (task 'custom')")
    test_data_path: str = key("", "a local CSV or JSONL file for centralised evaluation")
    text_column: str = key("text", "a non-empty column name", lambda v: bool(v.strip()))
    label_column: str = key("label", "a non-empty column name", lambda v: bool(v.strip()))
    labels: str = key("", "comma-separated label names (task 'custom')")
    output_dir: str = key("results", "a non-empty folder path", lambda v: bool(v.strip()))
    run_name: str = key(
        "", "a folder name without '/' ('' : a timestamped name)",
        lambda v: "/" not in v and v not in (".", ".."))
    dropout_fraction: float = key(
        0.0, "a fraction in [0, 1)", lambda v: 0 <= v < 1,
        help="Simulation: the share of sampled clients that fail in a round (their ClientApp "
        "raises, as a crashed site would); chosen per round from seed.")
    straggler_fraction: float = key(
        0.0, "a fraction in [0, 1)", lambda v: 0 <= v < 1,
        help="Simulation: the share of sampled clients that reply straggler-delay seconds "
        "late; with a round-timeout below the delay they are dropped.")
    straggler_delay: float = key(30.0, "a float >= 0 (seconds)", lambda v: v >= 0)
    resume: bool = key(
        False, "true or false",
        help="Continue output-dir/run-name (with run-name '': the newest unfinished run in "
        "output-dir) from its last finished round, using the checkpoint saved every round.")
    round_timeout: float = key(
        0.0, "a float >= 0 (0: wait for every reply)", lambda v: v >= 0,
        help="Seconds to wait for the replies of a round; nodes that have not replied by then "
        "are logged as dropped and the round goes on without them. With 0 a node that goes "
        "offline is dropped when it misses its heartbeats (about a minute).")
    stop_after_empty_rounds: int = key(
        3, "an integer >= 0 (0: never stop)", lambda v: v >= 0,
        help="Stop the run, saying why, after this many rounds in a row in which no reply was "
        "accepted (every one refused or dropped): such rounds spend the sites' privacy "
        "budget and change nothing.")
    secure_aggregation: bool = key(
        False, "true or false",
        help="Secure aggregation (SecAgg+): the server learns only the sum of the sampled "
        "sites' clipped, quantised updates, never one site's (docs/secure_aggregation.md).")
    secagg_threshold: float = key(
        0.0, "0 (default: 2/3 of the degree), a fraction in (0.5, 1] or a whole count > 1",
        lambda v: v == 0 or 0.5 < v <= 1 or (v > 1 and float(v).is_integer()),
        help="Secure aggregation: shares needed to rebuild a site's secrets, as a fraction "
        "of its neighbours or a count; a round with fewer survivors releases nothing.")
    secagg_degree: int = key(
        0, "0 (default: about 4 log2 of the cohort) or an even integer >= 2",
        lambda v: v == 0 or v >= 2,
        help="Secure aggregation: neighbours per site; at least the cohort size minus one "
        "(and the default for small cohorts) is every other sampled site.")
    secagg_clip: float = key(
        1.0, "a float > 0", _positive,
        help="Secure aggregation: each coordinate of a site's update is clipped to this "
        "public bound before it is quantised.")
    secagg_levels: int = key(
        1_048_575, "an integer in [1, 2^24]", lambda v: 1 <= v <= 2**24,
        help="Secure aggregation: integer steps between 0 and secagg-clip (the step is "
        "secagg-clip / secagg-levels; stochastic rounding).")
    dp_min_honest: float = key(
        0.8, "a fraction in (0, 1] of the cohort or a whole count > 1",
        lambda v: 0 < v <= 1 or (v > 1 and float(v).is_integer()),
        help="Distributed DP (dp-mode = sample or client with secure-aggregation = true): how "
        "many of a round's sampled sites are assumed honest, a count or a fraction of the "
        "cohort (rounded up). With dp-max-dropouts d, each site adds 1/(t - d) of the noise, "
        "so any sum the server may assemble holds enough honest shares.")
    dp_max_dropouts: float = key(
        0.0, "0, a fraction in (0, 1) of the cohort or a whole count >= 1",
        lambda v: v == 0 or 0 < v < 1 or (v >= 1 and float(v).is_integer()),
        help="Distributed DP: how many sampled sites may be missing from a sum (a count or a "
        "fraction of the cohort, rounded down). The server decides who counts as dropped, so "
        "each site assumes every missing one was honest: it adds 1/(t - d) of the noise and "
        "reveals nothing for a sum of fewer than cohort - d sites.")
    participation_cap: int = key(
        0, "an integer >= 0 (0: num-server-rounds x fraction-train, rounded up)",
        lambda v: v >= 0,
        help="Distributed user-level DP (dp-mode = client with secure-aggregation = true): "
        "the most rounds one site contributes to. Each site calibrates its noise share for "
        "that many releases and its ledger refuses any more; the server picks cohorts "
        "among the sites under the cap (no amplification by sampling is claimed).")

    @property
    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",")]

    @property
    def label_names(self) -> list[str]:
        return [s.strip() for s in self.labels.split(",") if s.strip()]

    def to_dict(self) -> dict[str, Any]:
        """The config as kebab-case run-config keys (what pyproject.toml holds)."""
        return {k.name: getattr(self, field_name(k.name)) for k in KEYS}


def field_name(name: str) -> str:
    """The :class:`RunConfig` field of a kebab-case key."""
    return name.replace("-", "_")


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
KEYS: tuple[Key, ...] = tuple(
    Key(f.name.replace("_", "-"), _TYPES[str(f.type)], f.default, f.metadata["expected"],
        f.metadata["check"], f.metadata["help"]) for f in dataclasses.fields(RunConfig))
KEYS_BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}


def defaults() -> dict[str, Any]:
    """The default value of every key, kebab-case."""
    return {k.name: k.default for k in KEYS}
