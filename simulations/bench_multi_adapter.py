"""Batched multi-adapter training against one client at a time, on the real default model.

    python -m simulations.bench_multi_adapter                      # k = 1, 2, 4, 8 clients
    python -m simulations.bench_multi_adapter --set 'base-dtype="float32"'

For each k, the same k clients (partitions 0..k-1 of an iid split of the task's pool)
train ``--steps`` mini-batches of ``--batch-size`` from the same starting adapter, twice:

* ``sequential``: one client after the other on the cached model, as a simulation worker
  serves them (load the adapter, :func:`fedlora.training.train`, read the adapter back);
* ``batched``: all k at once with :func:`simulations.multi_adapter.train_batched`: one forward
  and backward pass of the frozen base over the k mini-batches, each client's own LoRA
  factors and head applied to its own rows.

Both run in this process on ``--threads`` torch threads (default 1: a simulation worker's
share of a CPU), ``--repeats`` times after a warm-up; the median wall time is reported, and
client updates per second of batched over sequential as the ratio. Non-private training
(DP-SGD is not batched). Results: a table on stdout and JSON under
``results/bench-multi-adapter/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "results" / "bench-multi-adapter"


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clients expects integers like 1,2,4, got {text!r}"
                                         ) from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"--clients expects positive integers, got {text!r}")
    return ks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.bench_multi_adapter",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=_parse_ks, default=[1, 2, 4, 8],
                    help="numbers of clients trained together (default 1,2,4,8)")
    ap.add_argument("--steps", type=int, default=2, help="mini-batches per client (default 2)")
    ap.add_argument("--batch-size", type=int, default=32, help="examples per mini-batch (32)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config overrides (e.g. base-dtype=\"float32\", task=\"news\")")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    for name in ("steps", "batch_size", "threads", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")

    import torch

    from fedlora import runtime
    from fedlora.adapters import adapter_state, load_adapter_state
    from fedlora.models import cached_lora_model
    from fedlora.training import train
    from simulations.harness import parse_sets
    from simulations.multi_adapter import train_batched

    torch.set_num_threads(args.threads)
    k_max = max(args.clients)
    overrides = {"partitioner": "iid", "num-partitions": max(10, k_max),
                 **parse_sets(args.sets)}
    cfg = runtime.resolve_config(overrides)
    spec = runtime.model_spec(cfg)
    model = cached_lora_model(spec)
    start = adapter_state(model)
    clients = [runtime.client_data(cfg, partition_id=j, num_partitions=cfg.num_partitions,
                                   data_path=None) for j in range(k_max)]
    common = dict(steps=args.steps, batch_size=args.batch_size,
                  learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                  optimizer=cfg.optimizer)

    def sequential(k: int) -> None:
        for j in range(k):
            load_adapter_state(model, start)
            train(model, clients[j].data, clients[j].train_idx, seed=j, **common)
            adapter_state(model)

    def batched(k: int) -> None:
        train_batched(model, [start] * k, [c.data for c in clients[:k]],
                      [c.train_idx for c in clients[:k]], seeds=list(range(k)), **common)

    def timed(fn, k: int) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn(k)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    print(f"bench-multi-adapter: task {cfg.task}, base {spec.base_dtype}, {args.steps} steps x "
          f"batch {args.batch_size} per client, {args.threads} thread(s), median of "
          f"{args.repeats}", flush=True)
    # Warm-up: first-call costs stay out of the timings.
    sequential(1)
    batched(min(2, k_max))
    rows = []
    for k in args.clients:
        seq, bat = timed(sequential, k), timed(batched, k)
        row = {"clients": k, "sequential_s": seq, "batched_s": bat,
               "sequential_updates_per_s": k / seq, "batched_updates_per_s": k / bat,
               "ratio": seq / bat}
        rows.append(row)
        print(f"  k={k}: sequential {seq:.2f} s, batched {bat:.2f} s: {seq / bat:.2f}x",
              flush=True)
    lines = ["| clients k | sequential (s) | batched (s) | updates/s sequential | updates/s "
             "batched | batched / sequential |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['sequential_s']:.2f} | {r['batched_s']:.2f} | "
                     f"{r['sequential_updates_per_s']:.2f} | {r['batched_updates_per_s']:.2f} | "
                     f"{r['ratio']:.2f}x |")
    print()
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({
        "command": " ".join(["python -m simulations.bench_multi_adapter", *(argv or sys.argv[1:])]),
        "task": cfg.task, "base_dtype": spec.base_dtype, "steps": args.steps,
        "batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats,
        "rows": rows}, indent=2))
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"\nresults in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
