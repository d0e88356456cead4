"""The figures of each configuration (updates/s, memory) and the Markdown table of them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .configs import BASELINE, PATTERNS, pattern_app


def summarise(res: Mapping[str, Any], warmup_rounds: int) -> dict[str, Any]:
    """updates/s over the timed rounds (and over all rounds) of one configuration."""
    rounds = res["rounds"]
    timed = rounds[warmup_rounds:]
    updates = sum(r["ok"] for r in timed)
    seconds = sum(r["seconds"] for r in timed)
    all_updates = sum(r["ok"] for r in rounds)
    all_seconds = sum(r["seconds"] for r in rounds)
    client = [s for r in timed for s in r["client_seconds"]]
    return {
        "pattern": res["pattern"],
        "nodes": res["nodes"],
        "timed_updates": updates,
        "timed_seconds": seconds,
        "updates_per_s": updates / seconds if seconds > 0 else float("nan"),
        "all_updates": all_updates,
        "all_seconds": all_seconds,
        "updates_per_s_all_rounds": all_updates / all_seconds if all_seconds > 0 else float("nan"),
        "client_seconds_mean": sum(client) / len(client) if client else float("nan"),
        "sent": sum(r["sent"] for r in rounds),
        "peak_rss_mb": res["peak_rss_mb"],
        "peak_rss_workers_mb": res["peak_rss_workers_mb"],
        "peak_rss_driver_mb": res["peak_rss_driver_mb"],
        "max_processes": res["max_processes"],
        "gpu_utilisation_pct": res.get("gpu_utilisation_pct", float("nan")),
        "peak_gpu_memory_mb": res.get("peak_gpu_memory_mb", float("nan")),
        "wall_seconds": res["wall_seconds"],
        "processes": res.get("processes", []),
    }


CSV_COLUMNS = ("dp_mode", "pattern", "nodes", "timed_updates", "timed_seconds", "updates_per_s",
               "all_updates", "all_seconds", "updates_per_s_all_rounds", "client_seconds_mean",
               "peak_rss_mb", "peak_rss_workers_mb", "peak_rss_driver_mb", "max_processes",
               "gpu_utilisation_pct", "peak_gpu_memory_mb", "wall_seconds")


def _ratio_pairs(present: set[str]) -> list[tuple[str, str]]:
    """(fedlora pattern, rebuild pattern) pairs to compare: every fedlora pattern against
    the float32 baseline, and a bfloat16 fedlora against a bfloat16 rebuild if both ran
    (what the cached model alone is worth at equal precision)."""
    pairs = [(p, BASELINE) for p in PATTERNS if pattern_app(p) == "fedlora"]
    pairs.append(("fedlora-bf16", "rebuild-bf16"))
    return [(f, b) for f, b in pairs if f in present and b in present]


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and b > 0 else float("nan")


def format_report(rows: Sequence[Mapping[str, Any]], nodes: Sequence[int]) -> str:
    """The results table and the ratios, as Markdown."""
    lines = [("| dp-mode | pattern | N | updates | train time (s) | updates/s | updates/s "
              "(all rounds) | client s/update | peak RSS (MB) | workers' RSS (MB) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    gpu = any(not math.isnan(r.get("peak_gpu_memory_mb", float("nan"))) for r in rows)
    if gpu:
        lines[0] += " GPU utilisation (timed rounds) | peak GPU memory (MiB) |"
        lines[1] += "---|---|"
    for r in rows:
        line = (f"| {r['dp_mode']} | {r['pattern']} | {r['nodes']} | {r['timed_updates']} | "
                f"{r['timed_seconds']:.1f} | {r['updates_per_s']:.3f} | "
                f"{r['updates_per_s_all_rounds']:.3f} | {r['client_seconds_mean']:.2f} | "
                f"{r['peak_rss_mb']:.0f} | {r['peak_rss_workers_mb']:.0f} |")
        if gpu:
            line += (f" {r.get('gpu_utilisation_pct', float('nan')):.0f}% | "
                     f"{r.get('peak_gpu_memory_mb', float('nan')):.0f} |")
        lines.append(line)
    by = {(r["dp_mode"], r["pattern"], r["nodes"]): r for r in rows}
    lines += ["", ("| dp-mode | N | patterns | ratio of updates/s | (all rounds) | "
                   "ratio of peak RSS |"), "|---|---|---|---|---|---|"]
    for dp_mode in dict.fromkeys(r["dp_mode"] for r in rows):
        for n in nodes:
            for fp, bp in _ratio_pairs({r["pattern"] for r in rows}):
                f, b = by.get((dp_mode, fp, n)), by.get((dp_mode, bp, n))
                if not (f and b):
                    continue
                speed = _ratio(f["updates_per_s"], b["updates_per_s"])
                speed_all = _ratio(f["updates_per_s_all_rounds"], b["updates_per_s_all_rounds"])
                memory = _ratio(f["peak_rss_mb"], b["peak_rss_mb"])
                lines.append(f"| {dp_mode} | {n} | {fp} / {bp} | {speed:.2f}x | "
                             f"{speed_all:.2f}x | {memory:.2f}x |")
    if len(nodes) > 1:
        lo, hi = min(nodes), max(nodes)
        lines += ["", (f"| dp-mode | pattern | peak RSS N={hi} / N={lo} | workers' RSS "
                       f"N={hi} / N={lo} |"), "|---|---|---|---|"]
        for dp_mode in dict.fromkeys(r["dp_mode"] for r in rows):
            for pattern in PATTERNS:
                a, b = by.get((dp_mode, pattern, hi)), by.get((dp_mode, pattern, lo))
                if a and b:
                    total = _ratio(a["peak_rss_mb"], b["peak_rss_mb"])
                    workers = _ratio(a["peak_rss_workers_mb"], b["peak_rss_workers_mb"])
                    lines.append(f"| {dp_mode} | {pattern} | {total:.2f}x | {workers:.2f}x |")
    return "\n".join(lines)
