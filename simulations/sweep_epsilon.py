"""Sweep the privacy budget epsilon on one task: LoRA against a private linear probe.

    python -m simulations.sweep_epsilon                        # eps 0.5, 1, 3, 8 and no DP
    python -m simulations.sweep_epsilon --epsilons 1,8 --rounds 3 --out results/my-sweep

Every run is the same federated fine-tuning (same seed, clients and rounds) with
``dp-mode = sample`` at one target epsilon, the DP recipe on (README, "DP that pays").
At each epsilon two methods are measured in this one command:

* ``lora``: the recipe as a user gets it (linear-probe rounds, then LoRA rounds);
* ``probe``: the private linear-probe baseline, every round training the head alone
  (``probe-rounds = num-server-rounds``): what LoRA must beat to be worth its noise.

plus the non-private run (``--no-baseline`` skips it). Writes ``table.md``, ``table.json``
and ``accuracy_vs_epsilon.png`` (accuracy against epsilon, one line per method, with the
majority class and the non-private run drawn) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.harness import parse_sets  # noqa: E402
from simulations.privacy_modes import measure  # noqa: E402

METHODS = ("lora", "probe")
LABELS = {"lora": "LoRA (DP recipe: probe rounds, then LoRA)",
          "probe": "linear probe only (head-only rounds)"}


def majority_accuracy(overrides: dict) -> float:
    """Accuracy of always answering the test set's most common label."""
    from fedlora.runtime import resolve_config
    from fedlora.tasks import load_task_data

    labels = [int(v) for v in load_task_data(resolve_config(overrides)).test.labels]
    return Counter(labels).most_common(1)[0][1] / len(labels)


def plot(rows: list[dict], majority: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    private = [r for r in rows if r["target_epsilon"] is not None]
    for method in METHODS:
        pts = sorted((r["target_epsilon"], r["test_accuracy"]) for r in private
                     if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), "o-", label=LABELS[method])
    for r in rows:
        if r["target_epsilon"] is None:
            ax.axhline(r["test_accuracy"], ls="--", color="gray", label="no DP")
    ax.axhline(majority, ls=":", color="firebrick", label="majority class")
    eps = sorted({r["target_epsilon"] for r in private})
    ax.set_xscale("log")
    ax.set_xticks(eps)
    ax.set_xticklabels([format(e, "g") for e in eps])
    ax.minorticks_off()
    ax.set_xlabel("target epsilon per client (delta = %g)" % rows[0]["delta"])
    ax.set_ylabel("test accuracy (held-out movies)")
    ax.set_title("Accuracy against privacy budget (dp-mode = sample)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows: list[dict], majority: float) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = ["| method | target epsilon | noise multiplier | epsilon spent (max) | "
             "test accuracy | wall time (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {f(r['target_epsilon'], 'g')} | "
                     f"{f(r.get('noise_multiplier'), '.4f')} | "
                     f"{f(r.get('epsilon_spent'), '.3f')} | {r['test_accuracy']:.4f} | "
                     f"{r['seconds']:.0f} |")
    lines.append(f"| majority class | - | - | - | {majority:.4f} | - |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epsilons", default="0.5,1,3,8", help="comma-separated target epsilons")
    ap.add_argument("--methods", default=",".join(METHODS), help="lora, probe or both")
    ap.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "epsilon-sweep")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra run-config entries for every run (repeatable)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the table and plot from --out/table.json")
    args = ap.parse_args(argv)
    extra = {"num-server-rounds": args.rounds, "fraction-evaluate": 0.0,
             "target-delta": args.delta, **parse_sets(args.set)}
    out = args.out
    if args.replot:
        saved = json.loads((out / "table.json").read_text())
        rows, majority = saved["rows"], saved["majority"]
    else:
        out.mkdir(parents=True, exist_ok=True)
        majority = majority_accuracy(extra)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown} (known: {', '.join(METHODS)})")
        rows = []
        for eps in [float(e) for e in args.epsilons.split(",") if e.strip()]:
            for method in methods:
                more = {"probe-rounds": args.rounds} if method == "probe" else {}
                row = measure("sample", eps, clients=args.clients, out=out,
                              extra={**extra, **more}, name=f"{method}-eps-{eps:g}")
                rows.append({**row, "method": method, "delta": args.delta})
                print(f"{method} eps={eps:g}: test accuracy {row['test_accuracy']:.4f} "
                      f"({row['seconds']:.0f} s)", flush=True)
                (out / "table.json").write_text(json.dumps({"rows": rows, "majority": majority},
                                                           indent=2) + "\n")
        if not args.no_baseline:
            row = measure("off", None, clients=args.clients, out=out, extra=extra)
            rows.append({**row, "method": "no DP", "delta": args.delta})
            print(f"no DP: test accuracy {row['test_accuracy']:.4f}", flush=True)
        (out / "table.json").write_text(json.dumps({"rows": rows, "majority": majority},
                                                   indent=2) + "\n")
    text = table(rows, majority)
    (out / "table.md").write_text(text)
    plot(rows, majority, out / "accuracy_vs_epsilon.png")
    print(text)
    print(f"written: {out / 'table.md'}, {out / 'accuracy_vs_epsilon.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
