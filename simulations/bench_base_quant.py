"""Memory, step time and perplexity of one site's model with its frozen base quantised
(run-config ``base-quant``) on the ``shakespeare`` task.

    python -m simulations.bench_base_quant                           # none, int8, nf4
    python -m simulations.bench_base_quant --base-dtype float32 --steps 4 --batch-size 8

Each value of ``base-quant`` runs in a fresh process, as one site does: it builds the site's
model (SmolLM2-135M-Instruct, LoRA r = 8 on q/k/v/o/gate/up/down_proj), takes ``--steps``
AdamW steps on client 0's rows (the same seeded batches for every value), and evaluates
the perplexity of the held-out text (``--test-examples`` seeded test rows). It reports the
process's peak RSS (``ru_maxrss``: after building the model, and over the whole run), its
resident memory just after building (VmRSS), the bytes of the model's tensors (tied
weights once), seconds per training step and the perplexity, each with its ratio to the
``none`` run of the same command.
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


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_mb() -> float:
    """This process's resident memory now (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(quant: str, *, base_dtype: str, steps: int, batch_size: int, test_examples: int,
        threads: int) -> dict:
    """One site's model with ``base-quant = quant``, trained and evaluated in this process."""
    import numpy as np
    import torch

    from fedlora.models import build_lora_model
    from fedlora.runtime import client_data, encoded_test_set, model_spec, resolve_config
    from fedlora.training import evaluate, train

    torch.set_num_threads(threads)
    cfg = resolve_config({"task": "shakespeare", "base-quant": quant, "base-dtype": base_dtype,
                          "max-test-examples": test_examples})
    data = client_data(cfg, partition_id=0, num_partitions=20, data_path=None)
    test = encoded_test_set(cfg)
    before_model = _peak_mb()
    spec = model_spec(cfg)
    model = build_lora_model(spec)
    built, resident = _peak_mb(), _current_mb()
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights once
    tensor_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    t0 = time.perf_counter()
    res = train(model, data.data, np.asarray(data.train_idx), steps=steps,
                batch_size=batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed)
    step_s = (time.perf_counter() - t0) / steps
    trained = _peak_mb()
    t0 = time.perf_counter()
    ev = evaluate(model, test, batch_size=cfg.eval_batch_size)
    return {"quant": quant, "base_dtype": spec.base_dtype, "before_model_mb": before_model,
            "built_mb": built, "resident_after_build_mb": resident, "trained_mb": trained, "peak_rss_mb": _peak_mb(),
            "tensor_mb": tensor_bytes / 2**20, "seconds_per_step": step_s,
            "eval_s": time.perf_counter() - t0, "train_loss": res.loss,
            "perplexity": ev.perplexity, "test_examples": ev.examples}


def run(quant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "simulations.bench_base_quant", "--one", quant,
           "--base-dtype", args.base_dtype, "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--test-examples", str(args.test_examples), "--threads",
           str(args.threads)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"base-quant = {quant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quants", default="none,int8,nf4", help="values of base-quant; the "
                    "first is the baseline of the ratios")
    ap.add_argument("--base-dtype", default="auto", help="run-config base-dtype of every run")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--test-examples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, base_dtype=args.base_dtype, steps=args.steps,
                             batch_size=args.batch_size, test_examples=args.test_examples,
                             threads=args.threads)))
        return 0
    rows = [run(q.strip(), args) for q in args.quants.split(",") if q.strip()]
    base = rows[0]

    def ratio(r: dict, k: str) -> str:
        return f"{r[k]:,.2f} ({r[k] / base[k]:.2f}x)" if k == "seconds_per_step" else \
            f"{r[k]:,.0f} ({r[k] / base[k]:.2f}x)" if k.endswith("mb") else \
            f"{r[k]:.2f} ({r[k] / base[k]:.3f}x)"

    print("| base-quant | base dtype | model tensors MB | resident after build MB | peak RSS "
          "after build MB | peak RSS MB | s per step | perplexity |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['quant']}` | {r['base_dtype']} | {ratio(r, 'tensor_mb')} | "
              f"{ratio(r, 'resident_after_build_mb')} | {ratio(r, 'built_mb')} | "
              f"{ratio(r, 'peak_rss_mb')} | "
              f"{ratio(r, 'seconds_per_step')} | {ratio(r, 'perplexity')} |")
    print(f"({args.steps} steps of batch {args.batch_size}; perplexity on "
          f"{base['test_examples']} held-out rows; peak RSS before the model "
          f"{base['before_model_mb']:,.0f} MB; ratios against `{base['quant']}`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
