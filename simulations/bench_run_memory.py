"""Peak memory of every simulated client over a whole private run, by logical batch.

    python -m simulations.bench_run_memory                      # batch 32, then 1024
    python -m simulations.bench_run_memory --batches 32,1024 --set num-server-rounds=6

Each batch size runs one federated fine-tuning of the default task in a fresh process
(the in-process harness: the same ServerApp and ClientApp as ``flwr run``, 20 virtual
clients on one Ray worker per CPU), with ``dp-mode = "sample"``, the DP recipe's probe
rounds, ``local-steps = 5`` and the physical bound at its default. A sampler reads, every
half second, the peak resident memory (``VmHWM``) of every Ray worker that serves clients;
a worker serves many clients in turn, so its peak is the largest of theirs. The table
gives each batch's largest worker peak, its ratio to the first batch's (same command), the
run's wall time and its final test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RUN = {"dp-mode": "sample", "target-epsilon": 8.0, "num-server-rounds": 6, "probe-rounds": 4,
       "local-steps": 5}


def _parent(pid: str) -> str | None:
    try:
        return (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return None


def _descends_from(pid: str, root: str) -> bool:
    for _ in range(64):
        if pid == root:
            return True
        parent = _parent(pid)
        if parent is None or parent in ("0", "1"):
            return False
        pid = parent
    return False


def _worker_peaks() -> dict[int, float]:
    """pid -> peak RSS (MB) of this run's Ray workers that run simulated clients (those
    of the Ray instance this process started, not of other runs on the machine)."""
    out, me = {}, str(os.getpid())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            if b"ClientAppActor" not in cmd and b"ray::IDLE" not in cmd:
                continue
            if not _descends_from(proc.name, me):
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[int(proc.name)] = int(line.split()[1]) / 1024
        except OSError:
            continue
    return out


def one(batch: int, extra: dict, out_dir: str) -> dict:
    """One run in this process; the workers' peaks, wall time and final accuracy."""
    from simulations.harness import read_metrics, run_inprocess

    peaks: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            for pid, mb in _worker_peaks().items():
                peaks[pid] = max(mb, peaks.get(pid, 0.0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    overrides = dict(RUN, **extra, **{"batch-size": batch, "output-dir": out_dir,
                                      "run-name": f"batch{batch}"})
    try:
        run_dir = run_inprocess(overrides, num_nodes=20, total_cpus=2)
    finally:
        done.set()
        sampler.join()
    rounds = read_metrics(run_dir)["rounds"]
    return {"batch": batch, "seconds": time.perf_counter() - t0,
            "worker_peaks_mb": sorted(peaks.values(), reverse=True),
            "accuracy": rounds[-1]["test_accuracy"],
            "dropped": sum(r.get("clients_dropped") or 0 for r in rounds)}


def main(argv: list[str] | None = None) -> int:
    from simulations.harness import parse_sets

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="32,1024")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config override (repeatable)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    extra = parse_sets(args.set)
    if args.one is not None:
        print(json.dumps(one(args.one, extra, args.out)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in (int(x) for x in args.batches.split(",") if x):
            cmd = [sys.executable, "-m", "simulations.bench_run_memory", "--one", str(b),
                   "--out", tmp] + [f"--set={s}" for s in args.set]
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                return res.returncode
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"batch {b}: done in {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    base = max(rows[0]["worker_peaks_mb"])
    print(f"| logical batch | largest client-worker peak RSS (MB) | x batch {rows[0]['batch']} "
          "| workers' peaks (MB) | run time (s) | test accuracy | clients dropped |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = max(r["worker_peaks_mb"])
        print(f"| {r['batch']} | {peak:,.0f} | {peak / base:.2f} | "
              f"{', '.join(f'{p:,.0f}' for p in r['worker_peaks_mb'])} | {r['seconds']:.0f} | "
              f"{r['accuracy']:.4f} | {r['dropped']} |")
    print(f"(run: {json.dumps(dict(RUN, **extra))}; 20 virtual clients, 2 Ray workers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
