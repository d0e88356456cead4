"""Compare aggregators on the same task, rounds and clients; writes a markdown table.

    python -m simulations.compare_aggregators                  # default task, 6 rounds
    python -m simulations.compare_aggregators --rounds 2 --quick

Every run uses the same seed, partitions, rounds, number of sampled clients and local
steps, and samples the same partitions (the server orders nodes by partition-id); the
heterogeneous-rank runs give the virtual clients ranks 4, 8 and 16 in turn (global
rank 8). FFA-LoRA and FedSA-LoRA need one shared rank, so they have no heterogeneous row.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedlora.aggregation import METHODS  # noqa: E402
from simulations.harness import (  # noqa: E402
    comparison_args,
    parse_comparison,
    read_metrics,
    run_inprocess,
)

HET_RANKS = (4, 8, 16)


def main(argv: list[str] | None = None) -> int:
    ap = comparison_args(__doc__.split("\n")[0], ROOT / "results" / "compare-aggregators")
    ap.add_argument("--aggregators", default="fedavg,ffa,stack,svd,fedsa")
    ap.add_argument("--no-het", action="store_true", help="skip the heterogeneous-rank runs")
    args, extra = parse_comparison(ap, argv)
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
