"""Compare adapter families and LoRA inits on the same task, rounds and clients; writes a
markdown table.

    python -m simulations.compare_adapters                       # default task, 6 rounds
    python -m simulations.compare_adapters --rounds 2 --quick
    python -m simulations.compare_adapters --variants lora,vera --set learning-rate=0.02

Every run uses the same seed, partitions, rounds, sampled clients and local steps (without
DP). A variant is ``<adapter>`` or ``<adapter>+<lora-init>`` (``lora+pissa``). The table
has the final test accuracy and loss, the bytes of one client update, and the training
seconds the round's clients reported, summed over them and averaged over the rounds.
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

from simulations.harness import parse_sets, read_metrics, run_inprocess  # noqa: E402

VARIANTS = "lora,lora+gaussian,lora+pissa,lora+olora,dora,vera,c3a"


def _overrides(variant: str) -> dict[str, str]:
    adapter, _, init = variant.partition("+")
    return {"adapter": adapter, "lora-init": init or "default"}


def _train_seconds(rounds: list[dict]) -> float | None:
    """The training seconds the clients of a round reported, summed over them and averaged
    over the rounds."""
    per_round = [r["timing"].get("client_train") for r in rounds
                 if isinstance(r.get("timing"), dict) and r["timing"].get("client_train")]
    return sum(per_round) / len(per_round) if per_round else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "compare-adapters")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra run-config entries for every run (repeatable)")
    args = ap.parse_args(argv)
    extra = parse_sets(args.set)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.rounds, args.local_steps = min(args.rounds, 2), min(args.local_steps, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.variants.split(","):
        overrides = {
            **_overrides(variant), "num-server-rounds": args.rounds,
            "local-steps": args.local_steps, "fraction-train": 0.2, "fraction-evaluate": 0.0,
            "output-dir": str(args.out), "run-name": variant.replace("+", "-"),
        }
        t0 = time.perf_counter()
        run_dir = run_inprocess({**extra, **overrides}, num_nodes=args.clients)
        m = read_metrics(run_dir)
        final = m["rounds"][-1]
        rows.append({
            "variant": variant, "test_accuracy": final.get("test_accuracy"),
            "test_loss": final.get("test_loss"),
            "bytes_per_update": m["comms"]["bytes_per_client_update"],
            "train_seconds_per_round": _train_seconds(m["rounds"]),
            "seconds": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir),
        })
        print(f"{variant}: accuracy {final.get('test_accuracy'):.4f}, "
              f"{m['comms']['bytes_per_client_update']:,} B an update", flush=True)
    table = ["| variant | test accuracy | test loss | bytes per update | clients' train s / round "
             "| run s |", "|---|---|---|---|---|---|"]
    for r in rows:
        train = r["train_seconds_per_round"]
        table.append(f"| {r['variant']} | {r['test_accuracy']:.4f} | {r['test_loss']:.4f} | "
                     f"{r['bytes_per_update']:,} | {'-' if train is None else f'{train:.1f}'} "
                     f"| {r['seconds']} |")
    text = "\n".join(table) + "\n"
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    print(f"written: {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
