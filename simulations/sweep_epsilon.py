"""Sweep the privacy budget epsilon on one task: LoRA against a private linear probe.

    python -m simulations.sweep_epsilon                        # eps 0.5, 1, 3, 8 and no DP
    python -m simulations.sweep_epsilon --epsilons 1,8 --rounds 3 --out results/my-sweep

Every run is the same federated fine-tuning (same seed, clients and rounds) with
``dp-mode = sample`` at one target epsilon, the DP recipe on (docs/privacy.md, "DP that pays").
At each epsilon two methods are measured in this one command:

* ``lora``: the recipe as a user gets it (linear-probe rounds, then LoRA rounds);
* ``probe``: the private linear-probe baseline, every round training the head alone
  (``probe-rounds = num-server-rounds``): what LoRA must beat to be worth its noise;
* ``distributed``: distributed DP (``secure-aggregation = true``, its own recipe: every
  round one DP-SGD step of the head over the union of the sites' data, the noise added once
  to the secure sum; ``--rounds`` does not apply). Not run unless named in ``--methods``.
* ``distributed-lora``: the same, its last :data:`DISTRIBUTED_LORA_ROUNDS` rounds full-batch
  steps of the LoRA factors and the head. Not run unless named in ``--methods``.

plus the non-private run (``--no-baseline`` skips it). Writes ``table.md``, ``table.json``
and ``accuracy_vs_epsilon.png`` (accuracy against epsilon, one line per method, with the
majority class and the non-private run drawn) in ``--out``.

A private run's noise comes from OS entropy, so two runs of the same configuration differ.
``--repeats N`` runs every private configuration N times; the table then gives the mean and
standard deviation of the runs' test accuracy (the plot draws it as error bars) and, at each
epsilon, ``lora - probe`` with its standard error: whether LoRA adds anything is read from
that, not from one pair of runs. ``--add DIR`` counts the runs of an earlier sweep with the
same settings (its ``table.json``) as further repeats.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedlora.privacy.sample_level import DISTRIBUTED_ROUNDS  # noqa: E402
from simulations.harness import parse_sets  # noqa: E402
from simulations.privacy_modes import measure  # noqa: E402

METHODS = ("lora", "probe", "distributed", "distributed-lora")
LABELS = {"lora": "LoRA (DP recipe: probe rounds, then LoRA)",
          "probe": "linear probe only (head-only rounds)",
          "distributed": "distributed DP (secure sum, one step of the head per round)",
          "distributed-lora": "distributed DP, its last rounds full-batch steps of LoRA and head"}
#: ``distributed-lora``: the distributed recipe's rounds, the last this many LoRA steps.
DISTRIBUTED_LORA_ROUNDS = 5


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
    groups = summarise(rows)
    for method in METHODS:
        pts = sorted((g["target_epsilon"], g["mean"], g["sd"] or 0.0) for g in groups
                     if g["method"] == method and g["target_epsilon"] is not None)
        if not pts:
            continue
        eps, mean, sd = zip(*pts)
        line = ax.errorbar(eps, mean, yerr=sd if any(sd) else None, fmt="o-", capsize=3,
                           label=LABELS[method])
        runs = [(r["target_epsilon"], r["test_accuracy"]) for r in private
                if r["method"] == method]
        if len(runs) > len(pts):  # repeats: every run as a faint dot
            ax.plot(*zip(*runs), ".", color=line[0].get_color(), alpha=0.35)
    for g in groups:
        if g["target_epsilon"] is None:
            ax.axhline(g["mean"], ls="--", color="gray", label="no DP")
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


def _mean_sd(xs: list[float]) -> tuple[float, float | None]:
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (method, target epsilon), in the order first run: the runs' test
    accuracies, their mean and sample standard deviation (None for a single run)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["target_epsilon"]), []).append(r)
    out = []
    for (method, eps), runs in groups.items():
        acc = [r["test_accuracy"] for r in runs]
        mean, sd = _mean_sd(acc)
        sigmas = [r["noise_multiplier"] for r in runs if r.get("noise_multiplier") is not None]
        spent = [r["epsilon_spent"] for r in runs if r.get("epsilon_spent") is not None]
        out.append({"method": method, "target_epsilon": eps, "accuracies": acc, "mean": mean,
                    "sd": sd, "noise_multiplier": sum(sigmas) / len(sigmas) if sigmas else None,
                    "epsilon_spent": max(spent) if spent else None,
                    "seconds": sum(r["seconds"] for r in runs) / len(runs)})
    return out


def lora_minus_probe(groups: list[dict]) -> list[dict]:
    """At each epsilon with both methods: the difference of their mean accuracies and its
    standard error (None unless both have repeats)."""
    by = {(g["method"], g["target_epsilon"]): g for g in groups}
    out = []
    for g in groups:
        p = by.get(("probe", g["target_epsilon"]))
        if g["method"] != "lora" or p is None:
            continue
        se = None
        if g["sd"] is not None and p["sd"] is not None:
            se = math.sqrt(g["sd"] ** 2 / len(g["accuracies"])
                           + p["sd"] ** 2 / len(p["accuracies"]))
        out.append({"target_epsilon": g["target_epsilon"], "difference": g["mean"] - p["mean"],
                    "standard_error": se})
    return out


def table(rows: list[dict], majority: float) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    groups = summarise(rows)
    repeated = any(len(g["accuracies"]) > 1 for g in groups)
    if not repeated:
        lines = ["| method | target epsilon | noise multiplier | epsilon spent (max) | "
                 "test accuracy | wall time (s) |", "|---|---|---|---|---|---|"]
        for g in groups:
            lines.append(f"| {g['method']} | {f(g['target_epsilon'], 'g')} | "
                         f"{f(g['noise_multiplier'], '.4f')} | "
                         f"{f(g['epsilon_spent'], '.3f')} | {g['mean']:.4f} | "
                         f"{g['seconds']:.0f} |")
        lines.append(f"| majority class | - | - | - | {majority:.4f} | - |")
    else:
        lines = ["| method | target epsilon | runs | noise multiplier | epsilon spent (max) | "
                 "test accuracy, mean ± sd | every run | wall time per run (s) |",
                 "|---|---|---|---|---|---|---|---|"]
        for g in groups:
            acc = f"{g['mean']:.4f}" + (f" ± {g['sd']:.4f}" if g["sd"] is not None else "")
            lines.append(f"| {g['method']} | {f(g['target_epsilon'], 'g')} | "
                         f"{len(g['accuracies'])} | {f(g['noise_multiplier'], '.4f')} | "
                         f"{f(g['epsilon_spent'], '.3f')} | {acc} | "
                         f"{', '.join(format(a, '.4f') for a in g['accuracies'])} | "
                         f"{g['seconds']:.0f} |")
        lines.append(f"| majority class | - | - | - | - | {majority:.4f} | - | - |")
    diffs = lora_minus_probe(groups)
    if diffs:
        lines += ["", "| target epsilon | lora - probe (points) | standard error (points) |",
                  "|---|---|---|"]
        for d in diffs:
            se = "-" if d["standard_error"] is None else f"{100 * d['standard_error']:.2f}"
            lines.append(f"| {d['target_epsilon']:g} | {100 * d['difference']:+.2f} | {se} |")
    return "\n".join(lines) + "\n"


def _earlier_runs(paths: list[Path], delta: float) -> list[dict]:
    """The runs of earlier sweeps (``--add``), refused when their delta differs."""
    rows = []
    for path in paths:
        source = path / "table.json" if path.is_dir() else path
        if not source.is_file():
            raise SystemExit(f"--add {path}: no table.json there")
        for r in json.loads(source.read_text())["rows"]:
            if r["target_epsilon"] is not None and r.get("delta") != delta:
                raise SystemExit(f"--add {path}: its runs are at delta = {r.get('delta')}, "
                                 f"this sweep's --delta is {delta:g}")
            rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epsilons", default="0.5,1,3,8", help="comma-separated target epsilons")
    ap.add_argument("--methods", default="lora,probe",
                    help="comma-separated: lora, probe, distributed")
    ap.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of every private configuration (their noise differs)")
    ap.add_argument("--add", action="append", type=Path, default=[], metavar="DIR",
                    help="count an earlier sweep's runs (DIR/table.json, same settings) as "
                         "repeats (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "epsilon-sweep")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra run-config entries for every run (repeatable)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the table and plot from --out/table.json")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats: must be at least 1, got {args.repeats}")
    extra = {"num-server-rounds": args.rounds, "fraction-evaluate": 0.0,
             "target-delta": args.delta, **parse_sets(args.set)}
    out = args.out
    earlier = _earlier_runs(args.add, args.delta)
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
            for repeat in range(args.repeats):
                for method in methods:
                    more = {"probe-rounds": args.rounds} if method == "probe" else {}
                    if method.startswith("distributed"):  # its recipe's rounds, not --rounds
                        more = {"secure-aggregation": True,
                                "num-server-rounds": DISTRIBUTED_ROUNDS}
                    if method == "distributed-lora":
                        more["probe-rounds"] = DISTRIBUTED_ROUNDS - DISTRIBUTED_LORA_ROUNDS
                    name = f"{method}-eps-{eps:g}" + (f"-run{repeat + 1}"
                                                      if args.repeats > 1 else "")
                    row = measure("sample", eps, clients=args.clients, out=out,
                                  extra={**extra, **more}, name=name)
                    rows.append({**row, "method": method, "delta": args.delta})
                    print(f"{name}: test accuracy {row['test_accuracy']:.4f} "
                          f"({row['seconds']:.0f} s)", flush=True)
                    (out / "table.json").write_text(json.dumps(
                        {"rows": rows, "majority": majority}, indent=2) + "\n")
        if not args.no_baseline:
            row = measure("off", None, clients=args.clients, out=out, extra=extra)
            rows.append({**row, "method": "no DP", "delta": args.delta})
            print(f"no DP: test accuracy {row['test_accuracy']:.4f}", flush=True)
        (out / "table.json").write_text(json.dumps({"rows": rows, "majority": majority},
                                                   indent=2) + "\n")
    text = table(rows + earlier, majority)
    (out / "table.md").write_text(text)
    plot(rows + earlier, majority, out / "accuracy_vs_epsilon.png")
    print(text)
    print(f"written: {out / 'table.md'}, {out / 'accuracy_vs_epsilon.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
