"""Client-updates per second and peak memory of many virtual clients: fedlora's ClientApp
against the rebuild-per-message pattern of Flower's examples.

    python -m simulations.bench_clients                   # N = 10, 100, 1000; DP-SGD on
    python -m simulations.bench_clients --dp both         # DP-SGD and non-private
    python -m simulations.bench_clients --quick           # smoke run: N = 4, 2 timed updates
    python -m simulations.bench_clients --patterns fedlora-bf16,rebuild-bf16  # equal precision

Two ClientApps run through the same Flower simulation engine with the same ServerApp
(fedlora's, so the same sampling, reply checks and aggregation) and the same run-config:

* ``fedlora``: :mod:`client.client_app`. A simulation worker process loads the frozen base
  model, the tokenizer and the tokenised data once and serves every virtual client it is
  given from them; only the adapter tensors (and a DP client's privacy ledger in
  ``context.state``) belong to one client.
* ``rebuild``: :func:`build_rebuild_app` below, the pattern of Flower's examples. On every
  train message it re-instantiates the pretrained model from its folder, wraps it in a new
  peft LoRA adapter of the same spec, loads the received adapter, loads the tokenizer,
  tokenises its partition, builds a DataLoader and (with DP) a new Opacus
  ``PrivacyEngine`` + ``make_private``, trains, and replies in fedlora's wire format.

Each ClientApp runs as a pattern: ``fedlora`` and ``rebuild`` with the base model in float32
(the baseline is the plain ``rebuild``, as in Flower's examples), and ``fedlora-bf16`` and
``rebuild-bf16`` with run-config ``base-dtype = "bfloat16"``: the frozen base weights in
bfloat16, the adapter, its (per-example) gradients and the optimiser in float32. The default
runs fedlora, fedlora-bf16 and rebuild; the ratios compare each fedlora pattern with the
baseline, and fedlora-bf16 with rebuild-bf16 when both ran.

Same per-client work for all: every round samples the same number of nodes
(``--per-round``; ``fraction-train`` = k / N and ``min-train-nodes`` = k), each trains
``local-steps`` steps of ``batch-size`` examples with the same ``dp-mode``, and virtual node
i trains on partition ``i mod --partitions`` of an iid split of the task's pool (equal
partitions), so a client's data neither differs between clients nor shrinks as N grows.
The strategy samples the same nodes for both patterns (its generator is seeded).
``fraction-evaluate`` is 0; the server's centralised test set is kept small
(``test-fraction`` 0.01).

What is timed: the wall time of the ServerApp's training exchange of each round
(``Grid.send_and_receive`` of the train messages: messages out, the ClientApps' work in the
simulation's workers, replies back). Round 1 is a warm-up (worker processes start, import
torch and fill their caches) and is not counted; central evaluation and checkpoint writing
happen outside the exchange and are never counted. updates/s = accepted replies of rounds
2..R / summed exchange time of those rounds. The all-rounds figure is reported too.

Peak memory: every configuration runs in a fresh process; a thread of this process samples,
every ``--sample-interval`` seconds, the resident set sizes (RSS) of that process (the
ServerApp and Flower's simulation engine) and of all its descendants (Ray's processes and
the worker processes that run the ClientApps) and keeps the peak of their sum. RSS counts
shared pages (e.g. torch's libraries) once per process; the figure compares like with like.

On a GPU (``--gpus-per-client``, Flower's fractional ``client-resources-num-gpus``) the
clients run with ``device = "cuda"``, and a thread of this process reads ``nvidia-smi``
every sample: the GPUs' mean utilisation during the timed training exchanges and their peak
memory are reported.

Results: a table and ratios on stdout; JSON and CSV under ``results/bench-clients/``.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

log = logging.getLogger("fedlora.bench_clients")

__all__ = ["bench_overrides", "build_rebuild_app", "main", "rebuild_train", "run_one"]

# A pattern is a ClientApp and the dtype of its frozen base model: "-bf16" runs the same
# ClientApp with run-config base-dtype = "bfloat16" (adapter, gradients and optimiser stay
# float32), the others with "float32". The plain rebuild is the baseline: float32, as in
# Flower's examples.
PATTERNS = ("fedlora", "fedlora-bf16", "rebuild", "rebuild-bf16")
DEFAULT_PATTERNS = ("fedlora", "fedlora-bf16", "rebuild")
BASELINE = "rebuild"


def pattern_app(pattern: str) -> str:
    """The ClientApp of a pattern: fedlora or rebuild."""
    return pattern.split("-", 1)[0]


def pattern_overrides(pattern: str) -> dict[str, Any]:
    return {"base-dtype": "bfloat16" if pattern.endswith("-bf16") else "float32"}

DEFAULT_NODES = (10, 100, 1000)
DEFAULT_OUT = ROOT / "results" / "bench-clients"

# Quiet, offline, no telemetry: also what the simulation's worker processes inherit.
_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


# --- the rebuild-per-message baseline ----------------------------------------------------


def rebuild_train(msg: Message, context: Context) -> Message:
    """One train message handled the way Flower's examples do: everything built anew.

    Only the raw text pool stays cached in the process (as the examples keep their
    ``FederatedDataset`` in a global); the model, adapter, tokenizer, tokenised partition,
    data loader, optimiser and PrivacyEngine are created for this message and dropped after.
    """
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)
    from transformers.utils import logging as hf_logging

    from fedlora import methods, privacy
    from fedlora.config import parse_run_config
    from fedlora.data import CausalLMDataset, EncodedDataset, train_val_split
    from fedlora.models import (cast_frozen_base, choose_num_threads, head_name,
                                resolve_base_dtype, resolve_device)
    from fedlora.protocol import CONFIG_KEY, LORA_KEY, METRICS_KEY, STATUS_KEY, NodeInfo
    from fedlora.runtime import VAL_FRACTION
    from fedlora.tasks import TASKS, client_dataset, get_task
    from fedlora.wire import from_record, to_record

    t0 = time.perf_counter()
    cfg = parse_run_config(context.run_config, known_tasks=TASKS,
                           known_aggregators=methods.METHODS)
    if cfg.dp_mode not in ("off", "sample"):
        raise ValueError(f"the rebuild baseline runs dp-mode off or sample, not {cfg.dp_mode!r}")
    torch.set_num_threads(choose_num_threads(cfg.client_num_threads))  # as fedlora's client
    node = NodeInfo.from_node_config(context.node_config, cfg)
    pid = node.partition_id or 0
    task = get_task(cfg.task)
    model_path = task.model_path(cfg)
    rank = node.lora_rank or cfg.lora_rank
    method = methods.get_method(cfg.aggregator, alpha=cfg.lora_alpha, rank=cfg.lora_rank,
                                error_feedback=cfg.svd_error_feedback)

    # The model: re-instantiated from its folder, with a new LoRA adapter of the run's spec.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    if task.causal_lm:
        base = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
        base.config.use_cache = False
    else:
        base = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(task.label_names(cfg)), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tok.pad_token_id
    head = None if task.causal_lm else head_name(base)
    model = get_peft_model(base, LoraConfig(
        r=rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=[head] if cfg.train_head and head else None,
        task_type="CAUSAL_LM" if task.causal_lm else None))
    if method.freeze_a:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    device = resolve_device(cfg.device)
    base_dtype = resolve_base_dtype(cfg.base_dtype, device)
    if base_dtype != "float32":  # as fedlora's models.build_lora_model
        cast_frozen_base(model, getattr(torch, base_dtype))
    model.to(device)  # as Flower's examples: net.to(device)
    method.load(model, from_record(msg.content[LORA_KEY]), client_rank=rank)

    # The data: this client's partition, tokenised for this message.
    texts = client_dataset(cfg, partition_id=node.partition_id,
                           num_partitions=node.num_partitions, data_path=node.data_path)
    enc = (CausalLMDataset if task.causal_lm else EncodedDataset)(texts, tok, cfg.max_length)
    train_idx, _ = train_val_split(len(enc), VAL_FRACTION, cfg.seed + pid)
    server_round = int(msg.content[CONFIG_KEY].get("server-round", 0))
    seed = cfg.seed * 1_000_003 + server_round * 7919 + pid
    # Items are 1-tuples (Opacus' Poisson loader reads the structure of an item); a batch is
    # padded to its longest row, as in fedlora's client.
    loader = DataLoader([(int(i),) for i in train_idx], batch_size=cfg.batch_size, shuffle=True,
                        collate_fn=lambda items: enc.collate([int(i) for (i,) in items]),
                        # DP-SGD's Poisson masks come from this generator: OS entropy then
                        generator=(privacy.private_torch_generator() if cfg.dp_mode == "sample"
                                   else torch.Generator().manual_seed(seed)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    metrics: dict[str, Any] = {"num-examples": len(train_idx)}
    engine = None
    if cfg.dp_mode == "sample":
        from opacus import PrivacyEngine

        plan = privacy.plan_for(cfg, len(train_idx))  # same noise multiplier as fedlora's client
        engine = PrivacyEngine(accountant=cfg.accountant)
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
            noise_generator=privacy.private_torch_generator(device))
        metrics.update({"dp-noise-multiplier": plan.noise_multiplier,
                        "dp-sample-rate": 1.0 / len(loader), "dp-delta": cfg.target_delta})

    # local-steps optimiser steps, cycling over the loader.
    model.train()
    losses: list[float] = []
    steps = 0
    while steps < cfg.local_steps:
        for batch in loader:
            if steps >= cfg.local_steps:
                break
            steps += 1
            if batch["labels"].numel() == 0:  # an empty Poisson batch: nothing to learn from
                continue
            out = model(**{k: v.to(device) for k, v in batch.items()})
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(out.loss.item()))
    reply = method.reply(model)
    if engine is not None:
        # This message's steps only: a new engine per message never composes across rounds.
        metrics.update({"dp-epsilon": engine.get_epsilon(cfg.target_delta), "dp-steps": steps})
    metrics.update({"train-loss": float(np.mean(losses)) if losses else float("nan"),
                    "train-steps": steps, "train-seconds": time.perf_counter() - t0})
    return Message(content=RecordDict({
        LORA_KEY: to_record(reply, cfg.wire_dtype),
        METRICS_KEY: MetricRecord(metrics),
        STATUS_KEY: ConfigRecord({"status": "ok"}),
    }), reply_to=msg)


def build_rebuild_app(overrides: Mapping[str, Any] | None = None,
                      mods: list | None = None) -> ClientApp:
    """The rebuild-per-message ClientApp (train messages, and the identity query that
    orders sampling; run it with ``fraction-evaluate`` = 0)."""
    from fedlora.protocol import with_overrides

    app = ClientApp(mods=mods or [])

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return rebuild_train(msg, with_overrides(context, overrides))

    @app.query()
    def _query(msg: Message, context: Context) -> Message:  # as fedlora's: same sampling
        from client.client_app import query_fn

        return query_fn(msg, context)

    return app


# --- one configuration, in its own process ----------------------------------------------


class _TimedGrid:
    """A Grid that records the wall time and the outcome of every send_and_receive."""

    def __init__(self, grid: Any, records: list[dict]) -> None:
        self._grid = grid
        self._records = records

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        started = time.time()  # wall clock: matched against the GPU readings of the parent
        t0 = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        seconds = time.perf_counter() - t0
        ok, client_seconds = 0, []
        for r in replies:
            if r.has_error():
                continue
            status = r.content.get("status")
            if status is not None and status.get("status", "ok") != "ok":
                continue
            ok += 1
            m = r.content.get("metrics")
            if m is not None and "train-seconds" in m:
                client_seconds.append(float(m["train-seconds"]))
        kinds = sorted({m.metadata.message_type for m in messages})
        self._records.append({"kind": ",".join(kinds), "sent": len(messages), "ok": ok,
                              "seconds": seconds, "client_seconds": client_seconds,
                              "started": started, "ended": time.time()})
        return replies


def bench_overrides(*, pattern: str, num_nodes: int, per_round: int, rounds: int,
                    local_steps: int, batch_size: int, dp_mode: str, partitions: int,
                    output_dir: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run-config of one configuration (the same for both patterns but for run-name)."""
    if not 1 <= per_round <= num_nodes:
        raise ValueError(f"--per-round {per_round} must be in [1, N = {num_nodes}]")
    out = {
        "num-server-rounds": rounds,
        "fraction-train": per_round / num_nodes,
        "min-train-nodes": per_round,
        "fraction-evaluate": 0.0,
        "local-steps": local_steps,
        "batch-size": batch_size,
        "dp-mode": dp_mode,
        "num-partitions": partitions,
        "partitioner": "iid",
        "test-fraction": 0.01,
        "output-dir": output_dir,
        "run-name": f"{pattern}-dp-{dp_mode}-n{num_nodes}",
    }
    out.update(dict(extra or {}))
    out.update(pattern_overrides(pattern))
    return out


def _client_timing_mod(msg, context, call_next):
    """Time each ClientApp call in its worker and put it in the reply as ``train-seconds``:
    the same measurement for both patterns (a private fedlora site itself releases no
    timing; in this benchmark the sites are simulated)."""
    t0 = time.perf_counter()
    reply = call_next(msg, context)
    metrics = None if reply.has_error() else reply.content.get("metrics")
    if metrics is not None:
        metrics["train-seconds"] = time.perf_counter() - t0
    return reply


def run_one(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run one (pattern, N) configuration in this process; returns its timings."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.client_app import build_app as fedlora_client_app
    from fedlora.protocol import with_overrides
    from server.server_app import main as server_main
    from simulations.harness import node_config_mod

    pattern, num_nodes = spec["pattern"], int(spec["nodes"])
    overrides = dict(spec["overrides"])
    partitions = int(overrides["num-partitions"])
    records: list[dict] = []

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        server_main(_TimedGrid(grid, records), with_overrides(context, overrides))

    # Virtual node i trains on partition i mod P: the same data per client for every N.
    mods = [node_config_mod(lambda pid: {"partition-id": pid % partitions}), _client_timing_mod]
    client_app = (fedlora_client_app(overrides, mods=mods) if pattern_app(pattern) == "fedlora"
                  else build_rebuild_app(overrides, mods=mods))
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_nodes,
        backend_config={"client_resources": {"num_cpus": float(spec["cpus_per_client"]),
                                             "num_gpus": float(spec.get("gpus_per_client",
                                                                        0.0))},
                        "init_args": {"include_dashboard": False,
                                      "num_cpus": int(spec["total_cpus"])}},
    )
    wall = time.perf_counter() - t0
    train = [r for r in records if r["kind"] == "train"]
    return {"pattern": pattern, "nodes": num_nodes, "rounds": train, "wall_seconds": wall}


# --- measuring from outside: memory of the process tree, GPU use -----------------------

NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits"]


def parse_nvidia_smi(text: str) -> tuple[float, float] | None:
    """(mean utilisation % over the GPUs, summed memory used MiB) from ``nvidia-smi
    --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits``; None if
    the output has no readable row."""
    utils, mems = [], []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        try:
            utils.append(float(parts[0]))
            mems.append(float(parts[1]))
        except ValueError:
            continue
    if not utils:
        return None
    return sum(utils) / len(utils), sum(mems)


def sample_gpu() -> tuple[float, float] | None:
    """One reading of the GPUs' utilisation and memory, or None without nvidia-smi."""
    try:
        out = subprocess.run(NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else None


class TreeMemorySampler(threading.Thread):
    """Samples the summed RSS of a process and all its descendants; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.2, gpu: bool = False) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.gpu = pid, interval, gpu
        self.gpu_utilisation: list[tuple[float, float]] = []  # (time.time(), %) per sample
        self.peak_gpu_memory = 0.0  # MiB, all processes on the GPUs
        self.stop_event = threading.Event()
        self.peak_total = 0  # bytes
        self.peak_workers = 0  # the simulation's worker processes (they run the ClientApps)
        self.peak_driver = 0
        self.max_processes = 0
        self.samples = 0
        self.per_process: dict[int, tuple[str, int]] = {}  # pid -> (name, peak RSS bytes)

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop_event.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = workers = driver = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    cmd = p.cmdline()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                name = (cmd[0] if cmd and cmd[0].startswith("ray::")
                        else " ".join(os.path.basename(c) for c in cmd[:3]) or p.name())
                prev = self.per_process.get(p.pid, ("", 0))[1]
                self.per_process[p.pid] = (name[:60], max(prev, rss))
                if p.pid == self.pid:
                    driver = rss
                elif name.startswith("ray::") and not name.endswith("Agent"):
                    workers += rss  # ClientAppActor and idle worker processes
            self.peak_total = max(self.peak_total, total)
            self.peak_workers = max(self.peak_workers, workers)
            self.peak_driver = max(self.peak_driver, driver)
            self.max_processes = max(self.max_processes, len(procs))
            if self.gpu:
                reading = sample_gpu()
                if reading is not None:
                    self.gpu_utilisation.append((time.time(), reading[0]))
                    self.peak_gpu_memory = max(self.peak_gpu_memory, reading[1])
            self.samples += 1
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


def measure(spec: Mapping[str, Any], log_path: Path, interval: float) -> dict[str, Any]:
    """Run one configuration in a fresh process while sampling its memory."""
    env = {**os.environ, **{k: v for k, v in _ENV.items() if k not in os.environ}}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    result_path = log_path.with_suffix(".json")
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "simulations.bench_clients", "--one", json.dumps(dict(spec)),
           "--one-result", str(result_path)]
    with log_path.open("w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
        sampler = TreeMemorySampler(proc.pid, interval,
                                    gpu=float(spec.get("gpus_per_client", 0.0)) > 0)
        sampler.start()
        try:
            rc = proc.wait()
        finally:
            sampler.stop()
    if rc != 0 or not result_path.is_file():
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-30:])
        raise RuntimeError(f"{spec['pattern']} N={spec['nodes']} failed (exit {rc}); "
                           f"log {log_path}:\n{tail}")
    res = json.loads(result_path.read_text())
    expected_rounds = int(spec["overrides"]["num-server-rounds"])
    if len(res["rounds"]) != expected_rounds:
        raise RuntimeError(f"{spec['pattern']} N={spec['nodes']}: {len(res['rounds'])} training "
                           f"rounds recorded, expected {expected_rounds}; see {log_path}")
    failed = sum(r["sent"] - r["ok"] for r in res["rounds"])
    if failed:
        raise RuntimeError(f"{spec['pattern']} N={spec['nodes']}: {failed} client update(s) "
                           f"failed or were refused; see {log_path}")
    mb = 1024 * 1024
    res.update(peak_rss_mb=sampler.peak_total / mb, peak_rss_workers_mb=sampler.peak_workers / mb,
               peak_rss_driver_mb=sampler.peak_driver / mb, max_processes=sampler.max_processes,
               memory_samples=sampler.samples,
               gpu_utilisation_pct=_timed_utilisation(sampler.gpu_utilisation, res["rounds"][1:]),
               peak_gpu_memory_mb=sampler.peak_gpu_memory if sampler.gpu else float("nan"),
               processes=sorted(({"pid": pid, "name": name, "peak_rss_mb": rss / mb}
                                 for pid, (name, rss) in sampler.per_process.items()),
                                key=lambda d: -d["peak_rss_mb"]))
    return res


def _timed_utilisation(readings: Sequence[tuple[float, float]],
                       rounds: Sequence[Mapping[str, Any]]) -> float:
    """Mean GPU utilisation (%) of the readings taken during the timed training exchanges
    (NaN without readings there: no GPU, or no nvidia-smi)."""
    inside = [u for t, u in readings
              if any(r.get("started", 0) <= t <= r.get("ended", -1) for r in rounds)]
    return sum(inside) / len(inside) if inside else float("nan")


def summarise(res: Mapping[str, Any], warmup_rounds: int) -> dict[str, Any]:
    """updates/s over the timed rounds (and over all rounds) of one configuration."""
    rounds = res["rounds"]
    timed = rounds[warmup_rounds:]
    updates = sum(r["ok"] for r in timed)
    seconds = sum(r["seconds"] for r in timed)
    all_updates = sum(r["ok"] for r in rounds)
    all_seconds = sum(r["seconds"] for r in rounds)
    client = [s for r in timed for s in r["client_seconds"]]
    return {
        "pattern": res["pattern"],
        "nodes": res["nodes"],
        "timed_updates": updates,
        "timed_seconds": seconds,
        "updates_per_s": updates / seconds if seconds > 0 else float("nan"),
        "all_updates": all_updates,
        "all_seconds": all_seconds,
        "updates_per_s_all_rounds": all_updates / all_seconds if all_seconds > 0 else float("nan"),
        "client_seconds_mean": sum(client) / len(client) if client else float("nan"),
        "sent": sum(r["sent"] for r in rounds),
        "peak_rss_mb": res["peak_rss_mb"],
        "peak_rss_workers_mb": res["peak_rss_workers_mb"],
        "peak_rss_driver_mb": res["peak_rss_driver_mb"],
        "max_processes": res["max_processes"],
        "gpu_utilisation_pct": res.get("gpu_utilisation_pct", float("nan")),
        "peak_gpu_memory_mb": res.get("peak_gpu_memory_mb", float("nan")),
        "wall_seconds": res["wall_seconds"],
        "processes": res.get("processes", []),
    }


# --- the command -------------------------------------------------------------------------

CSV_COLUMNS = ("dp_mode", "pattern", "nodes", "timed_updates", "timed_seconds", "updates_per_s",
               "all_updates", "all_seconds", "updates_per_s_all_rounds", "client_seconds_mean",
               "peak_rss_mb", "peak_rss_workers_mb", "peak_rss_driver_mb", "max_processes",
               "gpu_utilisation_pct", "peak_gpu_memory_mb", "wall_seconds")


def _ratio_pairs(present: set[str]) -> list[tuple[str, str]]:
    """(fedlora pattern, rebuild pattern) pairs to compare: every fedlora pattern against
    the float32 baseline, and a bfloat16 fedlora against a bfloat16 rebuild if both ran
    (what the cached model alone is worth at equal precision)."""
    pairs = [(p, BASELINE) for p in PATTERNS if pattern_app(p) == "fedlora"]
    pairs.append(("fedlora-bf16", "rebuild-bf16"))
    return [(f, b) for f, b in pairs if f in present and b in present]


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and b > 0 else float("nan")


def format_report(rows: Sequence[Mapping[str, Any]], nodes: Sequence[int]) -> str:
    """The results table and the ratios, as Markdown."""
    lines = [("| dp-mode | pattern | N | updates | train time (s) | updates/s | updates/s "
              "(all rounds) | client s/update | peak RSS (MB) | workers' RSS (MB) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    gpu = any(not math.isnan(r.get("peak_gpu_memory_mb", float("nan"))) for r in rows)
    if gpu:
        lines[0] += " GPU utilisation (timed rounds) | peak GPU memory (MiB) |"
        lines[1] += "---|---|"
    for r in rows:
        line = (f"| {r['dp_mode']} | {r['pattern']} | {r['nodes']} | {r['timed_updates']} | "
                f"{r['timed_seconds']:.1f} | {r['updates_per_s']:.3f} | "
                f"{r['updates_per_s_all_rounds']:.3f} | {r['client_seconds_mean']:.2f} | "
                f"{r['peak_rss_mb']:.0f} | {r['peak_rss_workers_mb']:.0f} |")
        if gpu:
            line += (f" {r.get('gpu_utilisation_pct', float('nan')):.0f}% | "
                     f"{r.get('peak_gpu_memory_mb', float('nan')):.0f} |")
        lines.append(line)
    by = {(r["dp_mode"], r["pattern"], r["nodes"]): r for r in rows}
    lines += ["", ("| dp-mode | N | patterns | ratio of updates/s | (all rounds) | "
                   "ratio of peak RSS |"), "|---|---|---|---|---|---|"]
    for dp_mode in dict.fromkeys(r["dp_mode"] for r in rows):
        for n in nodes:
            for fp, bp in _ratio_pairs({r["pattern"] for r in rows}):
                f, b = by.get((dp_mode, fp, n)), by.get((dp_mode, bp, n))
                if not (f and b):
                    continue
                speed = _ratio(f["updates_per_s"], b["updates_per_s"])
                speed_all = _ratio(f["updates_per_s_all_rounds"], b["updates_per_s_all_rounds"])
                memory = _ratio(f["peak_rss_mb"], b["peak_rss_mb"])
                lines.append(f"| {dp_mode} | {n} | {fp} / {bp} | {speed:.2f}x | "
                             f"{speed_all:.2f}x | {memory:.2f}x |")
    if len(nodes) > 1:
        lo, hi = min(nodes), max(nodes)
        lines += ["", (f"| dp-mode | pattern | peak RSS N={hi} / N={lo} | workers' RSS "
                       f"N={hi} / N={lo} |"), "|---|---|---|---|"]
        for dp_mode in dict.fromkeys(r["dp_mode"] for r in rows):
            for pattern in PATTERNS:
                a, b = by.get((dp_mode, pattern, hi)), by.get((dp_mode, pattern, lo))
                if a and b:
                    total = _ratio(a["peak_rss_mb"], b["peak_rss_mb"])
                    workers = _ratio(a["peak_rss_workers_mb"], b["peak_rss_workers_mb"])
                    lines.append(f"| {dp_mode} | {pattern} | {total:.2f}x | {workers:.2f}x |")
    return "\n".join(lines)


def _parse_nodes(text: str) -> list[int]:
    try:
        nodes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nodes expects integers like 10,100,1000, "
                                         f"got {text!r}") from None
    if not nodes or any(n < 1 for n in nodes):
        raise argparse.ArgumentTypeError(f"--nodes expects positive integers, got {text!r}")
    return nodes


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m simulations.bench_clients",
        description="Client-updates per second and peak memory of N virtual clients: "
        "fedlora's ClientApp (base model cached per worker process) against the "
        "rebuild-per-message pattern (model, adapter, data and PrivacyEngine rebuilt for "
        "every message), through the same Flower simulation engine and ServerApp.",
        epilog="Timed: the ServerApp's training exchanges (Grid.send_and_receive) of rounds "
        "after the warm-up round. Memory: peak summed RSS of the simulation process and all "
        "its descendants.")
    ap.add_argument("--nodes", type=_parse_nodes, default=None,
                    help="comma-separated numbers of virtual clients (default 10,100,1000; "
                    "--quick: 4)")
    ap.add_argument("--per-round", type=int, default=None,
                    help="clients sampled per round, the same for every N (default 4; --quick: 2)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="server rounds, the first a warm-up (default 4; --quick: 2)")
    ap.add_argument("--local-steps", type=int, default=None,
                    help="optimiser steps per client update (default 2; --quick: 1)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="examples per step (default 32, the run-config default; --quick: 8)")
    ap.add_argument("--dp", choices=("sample", "off", "both"), default="sample",
                    help="dp-mode of the clients: sample (DP-SGD with Opacus, default), off, "
                    "or both one after the other")
    ap.add_argument("--partitions", type=int, default=10,
                    help="partitions of the task's pool; virtual node i trains on partition "
                    "i mod this (default 10)")
    ap.add_argument("--cpus", type=int, default=2,
                    help="CPUs given to the simulation (default 2)")
    ap.add_argument("--cpus-per-client", type=float, default=1.0,
                    help="CPUs per ClientApp worker (default 1: --cpus workers in parallel)")
    ap.add_argument("--gpus-per-client", type=float, default=0.0,
                    help="GPU share per ClientApp worker (Flower's client-resources-num-gpus; "
                    "e.g. 0.1: ten workers per GPU). Above 0 the clients run with device "
                    "cuda and the GPUs' utilisation during the timed rounds and peak memory "
                    "are read with nvidia-smi (default 0: CPU only)")
    ap.add_argument("--patterns", default=",".join(DEFAULT_PATTERNS),
                    help=f"which ClientApps to run, of {', '.join(PATTERNS)} (default "
                    f"{','.join(DEFAULT_PATTERNS)}); -bf16: the same ClientApp with its frozen "
                    "base model in bfloat16 (run-config base-dtype)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra run-config overrides for both patterns (e.g. task=custom)")
    ap.add_argument("--sample-interval", type=float, default=0.2,
                    help="seconds between memory samples (default 0.2)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"results folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: N = 4, 2 clients per round, 2 rounds (2 timed updates), "
                    "1 step of batch 8")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--one-result", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:  # a child process: one configuration
        for k, v in _ENV.items():
            os.environ.setdefault(k, v)
        # Imported by its name (not as __main__) so that the simulation's worker processes
        # can import the ClientApp it defines.
        module = importlib.import_module("simulations.bench_clients")
        res = module.run_one(json.loads(args.one))
        Path(args.one_result).write_text(json.dumps(res))
        return 0

    from simulations.harness import parse_sets

    quick = args.quick
    nodes = args.nodes or ([4] if quick else list(DEFAULT_NODES))
    per_round = args.per_round or (2 if quick else 4)
    rounds = args.rounds or (2 if quick else 4)
    local_steps = args.local_steps or (1 if quick else 2)
    batch_size = args.batch_size or (8 if quick else 32)
    if rounds < 2:
        raise SystemExit("--rounds must be >= 2 (the first round is a warm-up)")
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    unknown = sorted(set(patterns) - set(PATTERNS))
    if unknown:
        raise SystemExit(f"--patterns: unknown {unknown} (known: {', '.join(PATTERNS)})")
    extra = parse_sets(args.sets)
    if quick:
        extra = {"max-length": 32, **extra}
    dp_modes = ["sample", "off"] if args.dp == "both" else [args.dp]
    for n in nodes:
        if per_round > n:
            raise SystemExit(f"--per-round {per_round} is more than N = {n}")
    if args.gpus_per_client < 0 or args.gpus_per_client > 1:
        raise SystemExit(f"--gpus-per-client must be in [0, 1], got {args.gpus_per_client:g}")
    if args.gpus_per_client > 0:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--gpus-per-client {args.gpus_per_client:g}: torch "
                             f"{torch.__version__} sees no GPU on this machine")
        extra = {"device": "cuda", **extra}

    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    print(f"bench-clients: N = {','.join(map(str, nodes))}; {per_round} clients per round x "
          f"{rounds} rounds (round 1 warm-up: {per_round * (rounds - 1)} timed updates per "
          f"configuration); per update {local_steps} steps of batch {batch_size}; dp-mode "
          f"{' and '.join(dp_modes)}; {args.cpus} CPUs, {args.cpus_per_client:g} per client"
          f"{f', {args.gpus_per_client:g} GPU per client' if args.gpus_per_client else ''}; "
          f"partition = node mod {args.partitions}", flush=True)
    rows: list[dict] = []
    t_start = time.perf_counter()
    for dp_mode in dp_modes:
        for n in nodes:
            for pattern in patterns:
                overrides = bench_overrides(
                    pattern=pattern, num_nodes=n, per_round=per_round, rounds=rounds,
                    local_steps=local_steps, batch_size=batch_size, dp_mode=dp_mode,
                    partitions=args.partitions, output_dir=str(out / "runs"), extra=extra)
                spec = {"pattern": pattern, "nodes": n, "overrides": overrides,
                        "total_cpus": args.cpus, "cpus_per_client": args.cpus_per_client,
                        "gpus_per_client": args.gpus_per_client}
                log_path = out / "logs" / f"{overrides['run-name']}.log"
                res = measure(spec, log_path, args.sample_interval)
                row = {"dp_mode": dp_mode, **summarise(res, warmup_rounds=1)}
                rows.append(row)
                print(f"  dp={dp_mode} {pattern:8s} N={n:<5d} {row['updates_per_s']:.3f} "
                      f"updates/s ({row['timed_updates']} in {row['timed_seconds']:.1f} s), "
                      f"peak RSS {row['peak_rss_mb']:.0f} MB, wall {row['wall_seconds']:.0f} s",
                      flush=True)
    report = format_report(rows, nodes)
    print()
    print(report)
    total = time.perf_counter() - t_start
    print(f"\nper update: {local_steps} steps x batch {batch_size}; timed = rounds 2..{rounds} "
          f"training exchanges; total {total:.0f} s; results in {out}")
    meta = {
        "command": " ".join(["python -m simulations.bench_clients", *(argv or sys.argv[1:])]),
        "nodes": nodes, "per_round": per_round, "rounds": rounds, "warmup_rounds": 1,
        "local_steps": local_steps, "batch_size": batch_size, "dp_modes": dp_modes,
        "partitions": args.partitions, "cpus": args.cpus, "cpus_per_client": args.cpus_per_client,
        "gpus_per_client": args.gpus_per_client,
        "overrides": extra, "machine": {"cpu_count": os.cpu_count(),
                                        "platform": platform.platform()},
        "total_seconds": total,
        "timed": "wall time of the ServerApp's training send_and_receive, rounds after the "
                 "warm-up; updates = accepted replies",
        "memory": "peak of the summed RSS of the simulation process and its descendants",
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "report.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
