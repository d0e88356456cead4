"""Step time and peak memory of DP-SGD against non-private training, on the default model.

    python -m simulations.bench_dp                  # non-private, Opacus hooks, Opacus ghost
    python -m simulations.bench_dp --steps 20 --batch-size 32 --threads 2

Every mode trains the same LoRA adapter (all-MiniLM-L6-v2, r = 8 on query/value, head
trained) on the same batches of Rotten Tomatoes snippets, each in a fresh subprocess so
that its peak resident memory is its own. Prints a table with ratios to the non-private run.
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

MODES = ("non-private", "hooks", "ghost")


def run_mode(mode: str, steps: int, batch_size: int, threads: int) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fedlora import runtime
    from fedlora.models import build_lora_model
    from fedlora.training import trainable_parameters

    torch.set_num_threads(threads)
    cfg = runtime.resolve_config({})
    model = build_lora_model(runtime.model_spec(cfg))
    data = runtime.client_data(cfg, partition_id=0, num_partitions=20, data_path=None)
    idx = data.train_idx[: batch_size * 4]
    batches = [data.data.collate(idx[i:i + batch_size]) for i in range(0, len(idx), batch_size)]
    width = max(b["input_ids"].shape[1] for b in batches)

    def pad(t):  # one width for all batches, so the data loader can stack them
        return nn.functional.pad(t, (0, width - t.shape[1]))

    ids = torch.cat([pad(b["input_ids"]) for b in batches])
    mask = torch.cat([pad(b["attention_mask"]) for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=batch_size)
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=2e-3)
    if mode != "non-private":
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        out = engine.make_private(module=model, optimizer=opt, criterion=criterion,
                                  data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                  poisson_sampling=False, grad_sample_mode=mode)
        if mode == "ghost":
            model, opt, criterion, loader = out
        else:
            model, opt, loader = out
    model.train()

    def step(batch):
        i, m, y = batch
        loss = criterion(model(input_ids=i, attention_mask=m).logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    batches = list(loader)
    for b in batches[:2]:  # warm-up
        step(b)
    t0 = time.perf_counter()
    for s in range(steps):
        step(batches[s % len(batches)])
    dt = (time.perf_counter() - t0) / steps
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "step_seconds": dt, "peak_rss_mb": peak_mb, "batch_size": batch_size,
            "tokens_per_batch": int(width), "threads": threads}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_mode(args.one, args.steps, args.batch_size, args.threads)))
        return 0
    rows = []
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, "-m", "simulations.bench_dp", "--one", mode,
                              "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                              "--threads", str(args.threads)], cwd=ROOT, capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{mode}: {rows[-1]['step_seconds'] * 1000:.0f} ms/step", flush=True)
    base = next(r for r in rows if r["mode"] == "non-private")
    print("\n| mode | step time (ms) | x non-private | peak RSS (MB) | x non-private |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['step_seconds'] * 1000:.0f} | "
              f"{r['step_seconds'] / base['step_seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f} |")
    print(f"\nbatch {base['batch_size']}, {base['tokens_per_batch']} tokens per row, "
          f"{base['threads']} threads, {args.steps} timed steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
