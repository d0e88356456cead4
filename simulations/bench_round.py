"""Where a round's seconds go: the per-round time breakdown of one run, as shares.

    python -m simulations.bench_round                          # the default task, 8 rounds
    python -m simulations.bench_round --rounds 3 --compare evaluate-every=4

Runs the federated fine-tuning in this process (Flower's simulation engine, 20 virtual
clients) and prints, from ``metrics.json``, each phase's seconds and share of the rounds:
the training exchange (the clients' set-up and training, plus Flower/Ray transport and
waiting), aggregation, the federated-evaluation exchange, the server's centralised
evaluation, writing (checkpoint, adapter, results, report) and the rest; and the clients'
busy seconds. With ``--compare KEY=VALUE`` a second run with that change follows in the
same command and the table gives the ratio of its run time to the first's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.harness import parse_sets, read_metrics, run_inprocess  # noqa: E402

ROWS = ("train_exchange", "aggregation", "eval_exchange", "central_eval", "writing", "other")
BUSY = ("client_setup", "client_train", "client_eval")


def breakdown(run_dir: Path) -> tuple[dict[str, float], float]:
    """Seconds per phase summed over the run's rounds, and the rounds' total."""
    rounds = [r for r in read_metrics(run_dir)["rounds"] if r.get("timing")]
    sums = {k: sum(r["timing"].get(k, 0.0) for r in rounds) for k in (*ROWS, *BUSY)}
    return sums, sum(r["timing"]["total"] for r in rounds)


def table(name: str, sums: dict[str, float], total: float) -> str:
    lines = [f"{name}: {total:.1f} s over the rounds", "| phase | seconds | share of the rounds |",
             "|---|---|---|"]
    for k in ROWS:
        lines.append(f"| {k.replace('_', ' ')} | {sums[k]:.1f} | {100 * sums[k] / total:.1f}% |")
    for k in BUSY:
        lines.append(f"| {k.replace('_', ' ')} (busy, summed over clients) | {sums[k]:.1f} | - |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench-round")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config entries for every run (repeatable)")
    ap.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                    help="a second run with these entries changed (repeatable)")
    args = ap.parse_args(argv)
    base = {"num-server-rounds": args.rounds, "output-dir": str(args.out),
            **parse_sets(args.set)}
    runs = [("baseline", base)]
    if args.compare:
        runs.append((" ".join(args.compare), {**base, **parse_sets(args.compare)}))
    totals = []
    for i, (name, overrides) in enumerate(runs):
        run_dir = run_inprocess({**overrides, "run-name": f"run{i}"}, num_nodes=args.clients)
        sums, total = breakdown(run_dir)
        final = read_metrics(run_dir)["rounds"][-1]["test_accuracy"]
        totals.append(total)
        print(table(f"{name} (final test accuracy {final})", sums, total), flush=True)
    if len(totals) == 2:
        print(f"run time ratio ({runs[1][0]} / baseline): {totals[1] / totals[0]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
