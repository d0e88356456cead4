"""The command: ``python -m simulations.bench_clients [options]``."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

from .configs import (
    _ENV,
    DEFAULT_NODES,
    DEFAULT_OUT,
    DEFAULT_PATTERNS,
    PATTERNS,
    ROOT,
    bench_overrides,
    default_patterns,
)
from .sampling import measure
from .summary import CSV_COLUMNS, format_report, summarise
from .timed_run import run_one


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
    ap.add_argument("--patterns", default=None,
                    help=f"which ClientApps to run, of {', '.join(PATTERNS)} (default "
                    f"{','.join(DEFAULT_PATTERNS)}, without -bf16 where the device has no "
                    "native bfloat16); -bf16: the same ClientApp with its frozen base model "
                    "in bfloat16 (run-config base-dtype)")
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
        # run_one and the ClientApps live in modules imported by their names (never as
        # __main__), so the simulation's worker processes can import them.
        res = run_one(json.loads(args.one))
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
    device = "cuda" if args.gpus_per_client > 0 else "cpu"
    chosen = args.patterns or ",".join(default_patterns(device))
    patterns = [p.strip() for p in chosen.split(",") if p.strip()]
    unknown = sorted(set(patterns) - set(PATTERNS))
    if unknown:
        raise SystemExit(f"--patterns: unknown {unknown} (known: {', '.join(PATTERNS)})")
    if device == "cuda":
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
