"""Measuring a configuration from outside its process: the memory of its process tree and
the GPUs' use, sampled while it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .configs import _ENV, ROOT

NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits"]


def parse_nvidia_smi(text: str) -> tuple[float, float] | None:
    """(mean utilisation % over the GPUs, summed memory used MiB) from ``nvidia-smi
    --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits``; None if
    the output has no readable row."""
    utils, mems = [], []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        try:
            utils.append(float(parts[0]))
            mems.append(float(parts[1]))
        except ValueError:
            continue
    if not utils:
        return None
    return sum(utils) / len(utils), sum(mems)


def sample_gpu() -> tuple[float, float] | None:
    """One reading of the GPUs' utilisation and memory, or None without nvidia-smi."""
    try:
        out = subprocess.run(NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else None


class TreeMemorySampler(threading.Thread):
    """Samples the summed RSS of a process and all its descendants; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.2, gpu: bool = False) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.gpu = pid, interval, gpu
        self.gpu_utilisation: list[tuple[float, float]] = []  # (time.time(), %) per sample
        self.peak_gpu_memory = 0.0  # MiB, all processes on the GPUs
        self.stop_event = threading.Event()
        self.peak_total = 0  # bytes
        self.peak_workers = 0  # the simulation's worker processes (they run the ClientApps)
        self.peak_driver = 0
        self.max_processes = 0
        self.samples = 0
        self.per_process: dict[int, tuple[str, int]] = {}  # pid -> (name, peak RSS bytes)

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop_event.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = workers = driver = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    cmd = p.cmdline()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                name = (cmd[0] if cmd and cmd[0].startswith("ray::")
                        else " ".join(os.path.basename(c) for c in cmd[:3]) or p.name())
                prev = self.per_process.get(p.pid, ("", 0))[1]
                self.per_process[p.pid] = (name[:60], max(prev, rss))
                if p.pid == self.pid:
                    driver = rss
                elif name.startswith("ray::") and not name.endswith("Agent"):
                    workers += rss  # ClientAppActor and idle worker processes
            self.peak_total = max(self.peak_total, total)
            self.peak_workers = max(self.peak_workers, workers)
            self.peak_driver = max(self.peak_driver, driver)
            self.max_processes = max(self.max_processes, len(procs))
            if self.gpu:
                reading = sample_gpu()
                if reading is not None:
                    self.gpu_utilisation.append((time.time(), reading[0]))
                    self.peak_gpu_memory = max(self.peak_gpu_memory, reading[1])
            self.samples += 1
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


def measure(spec: Mapping[str, Any], log_path: Path, interval: float) -> dict[str, Any]:
    """Run one configuration in a fresh process while sampling its memory."""
    env = {**os.environ, **{k: v for k, v in _ENV.items() if k not in os.environ}}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    result_path = log_path.with_suffix(".json")
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "simulations.bench_clients", "--one", json.dumps(dict(spec)),
           "--one-result", str(result_path)]
    with log_path.open("w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
        sampler = TreeMemorySampler(proc.pid, interval,
                                    gpu=float(spec.get("gpus_per_client", 0.0)) > 0)
        sampler.start()
        try:
            rc = proc.wait()
        finally:
            sampler.stop()
    if rc != 0 or not result_path.is_file():
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-30:])
        raise RuntimeError(f"{spec['pattern']} N={spec['nodes']} failed (exit {rc}); "
                           f"log {log_path}:\n{tail}")
    res = json.loads(result_path.read_text())
    expected_rounds = int(spec["overrides"]["num-server-rounds"])
    if len(res["rounds"]) != expected_rounds:
        raise RuntimeError(f"{spec['pattern']} N={spec['nodes']}: {len(res['rounds'])} training "
                           f"rounds recorded, expected {expected_rounds}; see {log_path}")
    failed = sum(r["sent"] - r["ok"] for r in res["rounds"])
    if failed:
        raise RuntimeError(f"{spec['pattern']} N={spec['nodes']}: {failed} client update(s) "
                           f"failed or were refused; see {log_path}")
    mb = 1024 * 1024
    res.update(peak_rss_mb=sampler.peak_total / mb, peak_rss_workers_mb=sampler.peak_workers / mb,
               peak_rss_driver_mb=sampler.peak_driver / mb, max_processes=sampler.max_processes,
               memory_samples=sampler.samples,
               gpu_utilisation_pct=_timed_utilisation(sampler.gpu_utilisation, res["rounds"][1:]),
               peak_gpu_memory_mb=sampler.peak_gpu_memory if sampler.gpu else float("nan"),
               processes=sorted(({"pid": pid, "name": name, "peak_rss_mb": rss / mb}
                                 for pid, (name, rss) in sampler.per_process.items()),
                                key=lambda d: -d["peak_rss_mb"]))
    return res


def _timed_utilisation(readings: Sequence[tuple[float, float]],
                       rounds: Sequence[Mapping[str, Any]]) -> float:
    """Mean GPU utilisation (%) of the readings taken during the timed training exchanges
    (NaN without readings there: no GPU, or no nvidia-smi)."""
    inside = [u for t, u in readings
              if any(r.get("started", 0) <= t <= r.get("ended", -1) for r in rounds)]
    return sum(inside) / len(inside) if inside else float("nan")
