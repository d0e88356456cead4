"""Private runs on every packaged classification task and a custom CSV, against no DP and
the majority class.

    python -m simulations.dp_tasks                                   # all tasks, eps 8 and 1, 3 runs
    python -m simulations.dp_tasks --tasks news --epsilons 1 --repeats 1

Each private run sets only ``dp-mode = "sample"`` and ``target-epsilon`` (the DP recipe
does the rest, as a user gets it); the non-private run sets nothing. Tasks:

* ``rotten-tomatoes`` (the default task): 2 labels, about 530 examples per site;
* ``news``: BBC News topics, 5 labels, about 90 articles per site;
* ``headlines`` (``task = "custom"``): the first line of every BBC News article (its
  headline) written to a CSV in ``--out``, 5 labels, 40 sites of about 45 headlines.

The table gives, per task, the majority-class accuracy of the test set, the non-private
run, and at each epsilon the mean (and each run) of the private runs' final test accuracy
with the share of the gap between the majority class and the non-private run it recovers.
Written to ``--out`` as ``table.md`` and ``table.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.privacy_modes import measure  # noqa: E402

TASKS = ("rotten-tomatoes", "news", "headlines")


def headlines_csv(out: Path) -> dict:
    """The headlines task's run-config: train/test CSVs of BBC News headlines (a seeded
    stratified fifth held out)."""
    from fedlora.data import split_stratified
    from fedlora.tasks import minilm_path
    from fedlora.tasks.news import _bbc_news_rows

    rows = _bbc_news_rows()
    train, test = split_stratified(rows.labels, 0.2, 0)
    paths = {}
    for name, idx in (("train", train), ("test", test)):
        path = out / f"headlines-{name}.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in idx:
                w.writerow([rows.texts[i].splitlines()[0].strip(),
                            rows.label_names[rows.labels[i]]])
        paths[name] = str(path)
    return {"task": "custom", "model-path": minilm_path(), "data-path": paths["train"],
            "test-data-path": paths["test"],
            "labels": ",".join(rows.label_names), "num-partitions": 40}


def majority(extra: dict) -> float:
    """The share of the test set's commonest label."""
    from fedlora.runtime import encoded_test_set, resolve_config

    labels = encoded_test_set(resolve_config(extra)).labels.numpy()
    return float(max((labels == y).mean() for y in set(labels.tolist())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--epsilons", default="8,1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true", help="skip the non-private runs")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "dp-tasks")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for task in (t for t in args.tasks.split(",") if t):
        extra = headlines_csv(args.out) if task == "headlines" else {"task": task}
        clients = int(extra.get("num-partitions", 20))
        row = {"task": task, "clients": clients, "majority": majority(extra), "private": {}}
        if not args.no_baseline:
            row["no_dp"] = measure("sample", None, clients=clients, out=args.out / task,
                                   extra=extra, total_cpus=2)["test_accuracy"]
            print(f"{task}: no DP {row['no_dp']:.4f}", file=sys.stderr, flush=True)
        for eps in (float(e) for e in args.epsilons.split(",") if e):
            accs = []
            for k in range(args.repeats):
                r = measure("sample", eps, clients=clients, out=args.out / task, extra=extra,
                            name=f"eps-{eps:g}-run-{k}", total_cpus=2)
                accs.append(r["test_accuracy"])
                print(f"{task}: eps {eps:g} run {k}: {accs[-1]:.4f} ({r['seconds']:.0f} s)",
                      file=sys.stderr, flush=True)
            row["private"][f"{eps:g}"] = accs
        results.append(row)
        (args.out / "table.json").write_text(json.dumps(results, indent=1))
    lines = ["| task | sites | majority | no DP | epsilon | private (mean of runs) | runs | "
             "gap recovered |", "|---|---|---|---|---|---|---|---|"]
    for row in results:
        for eps, accs in row["private"].items():
            mean = statistics.mean(accs)
            nodp = row.get("no_dp")
            gap = "-" if nodp is None or nodp <= row["majority"] else \
                f"{(mean - row['majority']) / (nodp - row['majority']):.0%}"
            lines.append(f"| {row['task']} | {row['clients']} | {row['majority']:.4f} | "
                         f"{'-' if nodp is None else format(nodp, '.4f')} | {eps} | "
                         f"{mean:.4f} | {', '.join(f'{a:.4f}' for a in accs)} | {gap} |")
    text = "\n".join(lines)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
