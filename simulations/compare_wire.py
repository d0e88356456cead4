"""Bytes and accuracy of each wire format, on the same federated fine-tuning.

    python -m simulations.compare_wire                          # default task, fedavg and svd
    python -m simulations.compare_wire --aggregators fedavg --wires float32,int4 --rounds 2

Every run is the task's default run (same seed, clients, rounds and sampled partitions)
with one ``wire-dtype`` (int8/int4 with and without error feedback) and one aggregator.
The bytes come from each run's communication log (comms.json: measured, and equal to
the analytic count); "up" is one client's training reply, "down" one training broadcast.
Writes ``table.md`` and ``table.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.harness import parse_sets, read_metrics, run_inprocess  # noqa: E402

WIRES = "float32,float16,int8,int8-no-ef,int4,int4-no-ef"


def wire_overrides(wire: str) -> dict:
    """Run-config entries of a wire name (``int4-no-ef``: int4 without error feedback)."""
    dtype = wire.removesuffix("-no-ef")
    return {"wire-dtype": dtype, "wire-error-feedback": not wire.endswith("-no-ef")}


def _per_message(run_dir: Path, direction: str) -> int:
    """The largest training message in ``direction`` (FLoRA's broadcasts grow by round)."""
    with (run_dir / "comms.csv").open() as f:
        sizes = [int(r["bytes"]) for r in csv.DictReader(f)
                 if r["direction"] == direction and r["kind"] == "train"]
    return max(sizes) if sizes else 0


def measure(aggregator: str, wire: str, *, clients: int, out: Path, extra: dict) -> dict:
    name = f"{aggregator}-{wire}"
    overrides = {**extra, **wire_overrides(wire), "aggregator": aggregator,
                 "output-dir": str(out), "run-name": name}
    return summarise(run_inprocess(overrides, num_nodes=clients), aggregator, wire)


def summarise(run_dir: Path, aggregator: str, wire: str) -> dict:
    """One row of the table from a finished run's folder."""
    metrics = read_metrics(run_dir)
    comms = metrics["comms"]
    return {"aggregator": aggregator, "wire": wire,
            "bytes_up": _per_message(run_dir, "up"), "bytes_down": _per_message(run_dir, "down"),
            "total_up": comms["total_bytes"]["up"], "total_down": comms["total_bytes"]["down"],
            "measured_equals_analytic": comms["measured_equals_analytic"],
            "test_accuracy": metrics["rounds"][-1]["test_accuracy"],
            "test_loss": metrics["rounds"][-1]["test_loss"],
            "seconds": metrics["rounds"][-1]["elapsed_seconds"], "run_dir": str(run_dir)}


def table(rows: list[dict]) -> str:
    lines = ["| aggregator | wire | bytes up (one reply) | vs float32 | bytes down (one "
             "broadcast) | vs float32 | test accuracy | vs float32 (pt) | test loss | "
             "run time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["aggregator"]: r for r in rows if r["wire"] == "float32"}
    for r in rows:
        b = base.get(r["aggregator"])
        ratio = lambda k: f"{r[k] / b[k]:.3f}" if b and b[k] else "–"  # noqa: E731
        delta = (f"{100 * (r['test_accuracy'] - b['test_accuracy']):+.2f}" if b else "–")
        lines.append(f"| {r['aggregator']} | {r['wire']} | {r['bytes_up']:,} | {ratio('bytes_up')}"
                     f" | {r['bytes_down']:,} | {ratio('bytes_down')} | "
                     f"{r['test_accuracy']:.4f} | {delta} | {r['test_loss']:.4f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--aggregators", default="fedavg,svd")
    ap.add_argument("--wires", default=WIRES,
                    help=f"comma-separated, from {WIRES} (default: all)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=None, help="default: the task's default")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "compare-wire")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra run-config entries for every run (repeatable)")
    ap.add_argument("--table-only", action="store_true",
                    help="rebuild the table from the run folders already in --out")
    args = ap.parse_args(argv)
    extra = {"fraction-evaluate": 0.0, **parse_sets(args.set)}
    if args.rounds:
        extra["num-server-rounds"] = args.rounds
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for aggregator in args.aggregators.split(","):
        for wire in args.wires.split(","):
            row = (summarise(args.out / f"{aggregator}-{wire}", aggregator, wire)
                   if args.table_only else
                   measure(aggregator, wire, clients=args.clients, out=args.out, extra=extra))
            rows.append(row)
            print(f"{aggregator:7s} {wire:11s} up {row['bytes_up']:>9,} B  down "
                  f"{row['bytes_down']:>9,} B  accuracy {row['test_accuracy']:.4f}  "
                  f"({row['seconds']:.0f} s)", flush=True)
            (args.out / "table.json").write_text(json.dumps(rows, indent=2))
    md = table(rows)
    (args.out / "table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
