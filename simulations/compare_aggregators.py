"""Compare aggregators on the same task, rounds and clients; writes a markdown table.

    python -m simulations.compare_aggregators                  # default task, 6 rounds
    python -m simulations.compare_aggregators --rounds 2 --quick

Every run uses the same seed, partitions, rounds, number of sampled clients and local
steps, and samples the same partitions (the server orders nodes by partition-id); the
heterogeneous-rank runs give the virtual clients ranks 4, 8 and 16 in turn (global
rank 8). FFA-LoRA and FedSA-LoRA need one shared rank, so they have no heterogeneous row.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedlora.aggregation import METHODS  # noqa: E402
from simulations.harness import parse_sets, read_metrics, run_inprocess  # noqa: E402

HET_RANKS = (4, 8, 16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--aggregators", default="fedavg,ffa,stack,svd,fedsa")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "compare-aggregators")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    ap.add_argument("--no-het", action="store_true", help="skip the heterogeneous-rank runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra run-config entries for every run (repeatable)")
    args = ap.parse_args(argv)
    extra = parse_sets(args.set)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.rounds, args.local_steps = min(args.rounds, 2), min(args.local_steps, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for agg in args.aggregators.split(","):
        for het in (False, True):
            if het and (args.no_het or not METHODS[agg].allows_rank_change):
                continue
            name = f"{agg}-{'het' if het else 'same'}"
            overrides = {
                "aggregator": agg, "num-server-rounds": args.rounds,
                "local-steps": args.local_steps, "fraction-train": 0.2,
                "fraction-evaluate": 0.0, "output-dir": str(args.out), "run-name": name,
            }
            t0 = time.perf_counter()
            run_dir = run_inprocess({**extra, **overrides}, num_nodes=args.clients,
                                    node_ranks=HET_RANKS if het else None)
            m = read_metrics(run_dir)
            final = m["rounds"][-1]
            comms = m["comms"]
            rows.append({
                "aggregator": agg, "ranks": "4/8/16" if het else "8",
                "test_accuracy": final.get("test_accuracy"), "test_loss": final.get("test_loss"),
                "bytes_up": comms["total_bytes"]["up"], "bytes_down": comms["total_bytes"]["down"],
                "seconds": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir),
            })
            print(f"{name}: accuracy {final.get('test_accuracy'):.4f}, up "
                  f"{comms['total_bytes']['up']:,} B, down {comms['total_bytes']['down']:,} B",
                  flush=True)
    table = ["| aggregator | client ranks | test accuracy | test loss | bytes up | bytes down |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['aggregator']} | {r['ranks']} | {r['test_accuracy']:.4f} | "
                     f"{r['test_loss']:.4f} | {r['bytes_up']:,} | {r['bytes_down']:,} |")
    text = "\n".join(table) + "\n"
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    print(f"written: {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
