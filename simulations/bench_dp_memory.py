"""Peak memory and step time of one private client, by logical batch, with and without the
physical bound (``max-physical-batch-size``).

    python -m simulations.bench_dp_memory                         # 32, 128, 512, 1024
    python -m simulations.bench_dp_memory --batches 32,128 --steps 3 --physical 64

Each configuration runs in a fresh process (peak RSS is per process: the high-water mark
of its resident memory, ``ru_maxrss``), as one simulated client does: the default task's
model as the DP recipe trains it (mean-pooled head, LoRA on query/value), partition 0 of 20
(about 530 examples), ``--steps`` DP-SGD steps at q = min(1, B / n) with Opacus hooks. The
bounded rows split every Poisson batch into chunks of at most ``--physical`` examples and
take one noisy step per logical batch; the unbounded rows take the whole batch at once
(run only at the small batches, where it fits). The table gives each row's peak RSS and
step time, and their ratio to the unbounded run at batch 32 measured in the same command.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def one(logical: int, physical: int | None, steps: int) -> dict:
    """Run ``steps`` private steps in this process; peak RSS (MB) and seconds per step."""
    import numpy as np
    import torch

    from fedlora.dp_sgd import train_private
    from fedlora.models import build_lora_model
    from fedlora.runtime import client_data, model_spec, resolve_config

    torch.set_num_threads(1)
    cfg = resolve_config({"dp-mode": "sample", "head-pooling": "mean"})
    data = client_data(cfg, partition_id=0, num_partitions=20, data_path=None)
    idx = np.asarray(data.train_idx)
    model = build_lora_model(model_spec(cfg))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q = min(1.0, logical / len(idx))
    t0 = time.perf_counter()
    train_private(model, data.data, idx, steps=steps, batch_size=logical, learning_rate=0.01,
                  noise_multiplier=1.0, max_grad_norm=1.0, optimizer="sgd", sample_rate=q,
                  expected_batch_size=logical, max_physical_batch_size=physical)
    seconds = (time.perf_counter() - t0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"logical": logical, "physical": physical, "examples": len(idx),
            "peak_rss_mb": peak, "before_training_mb": base, "seconds_per_step": seconds}


def run(logical: int, physical: int | None, steps: int) -> dict:
    args = [sys.executable, "-m", "simulations.bench_dp_memory", "--one", str(logical),
            "--steps", str(steps)]
    args += ["--physical", str(physical or 0)]  # 0: unbounded
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="32,128,512,1024",
                    help="logical batch sizes run with the physical bound")
    ap.add_argument("--unbounded", default="32,128", help="logical batch sizes run without it")
    ap.add_argument("--physical", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.physical if args.physical > 0 else None,
                             args.steps)))
        return 0
    rows = [run(int(b), None, args.steps) for b in args.unbounded.split(",") if b]
    rows += [run(int(b), args.physical, args.steps) for b in args.batches.split(",") if b]
    base = rows[0]
    print(f"| logical batch | physical bound | peak RSS (MB) | x batch {base['logical']} "
          "unbounded | s per step | x |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['logical']} | {r['physical'] or 'none'} | {r['peak_rss_mb']:,.0f} | "
              f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | {r['seconds_per_step']:.2f} | "
              f"{r['seconds_per_step'] / base['seconds_per_step']:.2f} |")
    print(f"(partition 0 of 20: {base['examples']} examples; {args.steps} steps each; memory "
          f"before training {base['before_training_mb']:,.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
