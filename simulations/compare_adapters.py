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

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.harness import (  # noqa: E402
    comparison_args,
    parse_comparison,
    read_metrics,
    run_inprocess,
)

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
    ap = comparison_args(__doc__.split("\n")[0], ROOT / "results" / "compare-adapters")
    ap.add_argument("--variants", default=VARIANTS)
    args, extra = parse_comparison(ap, argv)
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
