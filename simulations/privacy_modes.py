"""Each DP mode at a few budgets on one task: noise, epsilon checked independently, accuracy.

    python -m simulations.privacy_modes                       # sample, update, client at eps 8, 1
    python -m simulations.privacy_modes --modes update --epsilons 8 --rounds 3

Every run is the same federated fine-tuning (the task's defaults, same seed and clients)
with one ``dp-mode`` at one target epsilon. For each run the table gives the noise
multiplier, the noise std actually added per coordinate (``sample``: on a step's mean
gradient, sigma C / B; ``update``: on each entry of a client's update, 2 sigma C;
``client``: on each entry of the mean update, sigma C / W), the largest epsilon spent,
that epsilon recomputed from the run's privacy.csv with Google's dp_accounting (an
independent RDP implementation), and the final test accuracy. Writes ``table.md`` and
``table.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.harness import parse_sets, read_metrics, run_inprocess  # noqa: E402


def _noise_std(mode: str, sigma: float, cfg, clients: int) -> float:
    """The std per coordinate of what each mode adds (see the module docstring)."""
    if mode == "sample":
        return sigma * cfg.max_grad_norm / cfg.batch_size
    if mode == "update":
        return sigma * 2 * cfg.update_max_norm
    return sigma * cfg.update_max_norm / (cfg.fraction_train * clients)


def measure(mode: str, eps: float | None, *, clients: int, out: Path, extra: dict,
            name: str | None = None, total_cpus: int | None = None) -> dict:
    """Run one configuration; its accuracy, wall time and (under DP) its noise and spend."""
    from fedlora import privacy
    from fedlora.runtime import resolve_config

    name = name or ("no-dp" if eps is None else f"{mode}-eps-{eps:g}")
    overrides = {**extra, "output-dir": str(out), "run-name": name}
    if eps is not None:
        overrides.update({"dp-mode": mode, "target-epsilon": eps})
    run_dir = run_inprocess(overrides, num_nodes=clients, total_cpus=total_cpus)
    metrics = read_metrics(run_dir)
    row = {"mode": "off" if eps is None else mode, "target_epsilon": eps,
           "test_accuracy": metrics["rounds"][-1]["test_accuracy"],
           "initial_accuracy": metrics["rounds"][0]["test_accuracy"],
           "seconds": metrics["rounds"][-1]["elapsed_seconds"], "run_dir": str(run_dir)}
    if eps is None:
        return row
    cfg = resolve_config(overrides)
    with (run_dir / "privacy.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["mode"] == mode]
    last: dict[str, dict] = {}
    for r in rows:  # each privacy unit's latest row: its whole spend so far
        last[r["node"]] = r
    if last:
        worst = max(last.values(), key=lambda r: float(r["epsilon"]))
        sigma, q, steps = (float(worst["noise_multiplier"]), float(worst["sample_rate"]),
                           int(worst["steps"]))
        spent = float(worst["epsilon"])
    elif cfg.secure_aggregation and mode == "sample":
        # Distributed DP: no site's ledger reaches the server, and every site's plan is the
        # same (one full-batch step a round), whatever its count.
        from fedlora.privacy.count import count_history

        plan = privacy.client_mechanism(mode).plan(cfg, 1000)
        sigma, q, steps = plan.noise_multiplier, 1.0, cfg.num_server_rounds
        spent = privacy.epsilon_of_history(
            [*count_history(plan.count_noise), (sigma, q, steps)],
            delta=cfg.target_delta, accountant=plan.accountant)
    else:
        raise ValueError(f"no privacy rows in {run_dir / 'privacy.csv'} for mode {mode}")
    row.update({
        "noise_multiplier": sigma,
        "noise_std_per_coordinate": _noise_std(mode, sigma, cfg, clients),
        "epsilon_spent": spent,
        "epsilon_dp_accounting": privacy.epsilon_dp_accounting(
            noise_multiplier=sigma, sample_rate=q, steps=steps, delta=cfg.target_delta),
        "sample_rate": q, "steps": steps,
    })
    return row


def table(rows: list[dict]) -> str:
    lines = ["| dp-mode | target epsilon | noise multiplier | noise std per coordinate | "
             "epsilon spent (max) | epsilon by dp_accounting | test accuracy | run time (s) |",
             "|---|---|---|---|---|---|---|---|"]

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    for r in rows:
        lines.append(f"| {r['mode']} | {f(r['target_epsilon'], 'g')} | "
                     f"{f(r.get('noise_multiplier'), '.4f')} | "
                     f"{f(r.get('noise_std_per_coordinate'), '.4g')} | "
                     f"{f(r.get('epsilon_spent'), '.3f')} | "
                     f"{f(r.get('epsilon_dp_accounting'), '.3f')} | "
                     f"{r['test_accuracy']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="sample,update,client")
    ap.add_argument("--epsilons", default="8,1")
    ap.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--total-cpus", type=int, default=None,
                    help="CPUs the simulation may use (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "privacy-modes")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra run-config entries for every run (repeatable)")
    args = ap.parse_args(argv)
    extra = {"fraction-evaluate": 0.0, **parse_sets(args.set)}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    runs = [(m.strip(), float(e)) for m in args.modes.split(",") if m.strip()
            for e in args.epsilons.split(",") if e.strip()]
    if not args.no_baseline:
        runs.append(("off", None))
    for mode, eps in runs:
        rows.append(measure(mode, eps, clients=args.clients, out=args.out, extra=extra,
                            total_cpus=args.total_cpus))
        print(f"{mode} eps={eps}: test accuracy {rows[-1]['test_accuracy']:.4f}", flush=True)
        (args.out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows)
    (args.out / "table.md").write_text(text)
    print(text)
    print(f"written: {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
