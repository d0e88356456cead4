"""Sweep the privacy budget epsilon on one task; table and plot of accuracy against epsilon.

    python -m simulations.sweep_epsilon                        # eps 0.5, 1, 3, 8 and no DP
    python -m simulations.sweep_epsilon --epsilons 1,8 --rounds 3 --out results/my-sweep

Each run is the same federated fine-tuning (same seed, clients, rounds and steps) with
``dp-mode = sample`` (DP-SGD with Opacus on every client) at one target epsilon; the noise
multiplier is calibrated per client for the whole run. Writes ``table.md``, ``table.json``
and ``accuracy_vs_epsilon.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.harness import parse_sets, read_metrics, run_inprocess  # noqa: E402


def plot(rows: list[dict], path: Path) -> None:
    """Test accuracy against epsilon (log axis); the non-private run as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = [r for r in rows if r["epsilon"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["epsilon"] for r in private], [r["test_accuracy"] for r in private], "o-",
            label="DP-SGD (dp-mode = sample)")
    for r in private:
        ax.annotate(f"σ={r['noise_multiplier']:.2f}", (r["epsilon"], r["test_accuracy"]),
                    textcoords="offset points", xytext=(4, -12), fontsize=8)
    for r in rows:
        if r["epsilon"] is None:
            ax.axhline(r["test_accuracy"], ls="--", color="gray", label="no DP")
    ax.axhline(rows[0]["initial_accuracy"], ls=":", color="silver", label="before training")
    ax.set_xscale("log")
    ax.set_xticks([r["epsilon"] for r in private])
    ax.set_xticklabels([format(r["epsilon"], "g") for r in private])
    ax.minorticks_off()
    ax.set_xlabel("target epsilon per client (delta = %g)" % rows[0]["delta"])
    ax.set_ylabel("test accuracy (held-out movies)")
    ax.set_title("Accuracy against privacy budget")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epsilons", default="0.5,1,3,8", help="comma-separated target epsilons")
    ap.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "epsilon-sweep")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra run-config entries for every run (repeatable)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the plot from --out/table.json")
    args = ap.parse_args(argv)
    extra = parse_sets(args.set)
    if args.replot:
        plot(json.loads((args.out / "table.json").read_text()), args.out / "accuracy_vs_epsilon.png")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    targets: list[float | None] = [float(e) for e in args.epsilons.split(",") if e.strip()]
    if not args.no_baseline:
        targets.append(None)
    rows = []
    for eps in targets:
        name = "no-dp" if eps is None else f"eps-{eps:g}"
        overrides = {"num-server-rounds": args.rounds, "local-steps": args.local_steps,
                     "fraction-evaluate": 0.0, "output-dir": str(args.out), "run-name": name,
                     "target-delta": args.delta}
        if eps is not None:
            overrides.update({"dp-mode": "sample", "target-epsilon": eps})
        run_dir = run_inprocess({**extra, **overrides}, num_nodes=args.clients)
        m = read_metrics(run_dir)
        final = m["rounds"][-1]
        sigmas, spent = [], []
        if eps is not None:
            import csv

            with (run_dir / "privacy.csv").open() as f:
                for r in csv.DictReader(f):
                    sigmas.append(float(r["noise_multiplier"]))
                    spent.append(float(r["epsilon"]))
        rows.append({
            "epsilon": eps, "delta": args.delta, "test_accuracy": final["test_accuracy"],
            "initial_accuracy": m["rounds"][0]["test_accuracy"],
            "noise_multiplier": (sum(sigmas) / len(sigmas)) if sigmas else None,
            "max_epsilon_spent": max(spent) if spent else None, "run_dir": str(run_dir),
        })
        print(f"{name}: test accuracy {final['test_accuracy']:.4f}", flush=True)
    lines = ["| target epsilon | noise multiplier (mean over clients) | max epsilon spent | "
             "test accuracy |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'no DP' if r['epsilon'] is None else format(r['epsilon'], 'g')} | "
                     f"{'-' if r['noise_multiplier'] is None else format(r['noise_multiplier'], '.3f')} | "
                     f"{'-' if r['max_epsilon_spent'] is None else format(r['max_epsilon_spent'], '.3f')} | "
                     f"{r['test_accuracy']:.4f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.out / "accuracy_vs_epsilon.png")
    print(text)
    print(f"written: {args.out / 'table.md'}, {args.out / 'accuracy_vs_epsilon.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
