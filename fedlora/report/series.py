"""The numbers a report draws and tabulates, derived from one run's data."""

from __future__ import annotations

import math
from collections import defaultdict

from .reading import RunData, _num


def round_bytes(run: RunData) -> list[tuple[int, int, int]]:
    """(round, bytes up, bytes down) for every round, from metrics or the comms summary."""
    per_round = run.comms.get("per_round") or {}
    out = []
    for r in run.rounds:
        rnd = int(_num(r.get("round")) or 0)
        fallback = per_round.get(str(rnd)) or {}
        up = _num(r.get("bytes_up"))
        down = _num(r.get("bytes_down"))
        up = up if up is not None else _num(fallback.get("up")) or 0
        down = down if down is not None else _num(fallback.get("down")) or 0
        out.append((rnd, int(up), int(down)))
    return out


def cumulative_bytes(run: RunData) -> tuple[list[int], list[int], list[int]]:
    """Rounds and the cumulative bytes up and down at the end of each."""
    rounds, ups, downs = [], [], []
    up = down = 0
    for rnd, u, d in round_bytes(run):
        up, down = up + u, down + d
        rounds.append(rnd)
        ups.append(up)
        downs.append(down)
    return rounds, ups, downs


def accuracy_metric(run: RunData) -> str:
    """``test_accuracy`` when the run has a centralised test set, else ``fed_eval_accuracy``."""
    if any(_num(r.get("test_accuracy")) is not None for r in run.rounds):
        return "test_accuracy"
    return "fed_eval_accuracy"


def accuracy_vs_bytes(run: RunData, metric: str = "test_accuracy") -> tuple[list[int], list[float]]:
    """Cumulative bytes (up + down) and the accuracy reached, for rounds that have one."""
    _, ups, downs = cumulative_bytes(run)
    xs, ys = [], []
    for r, up, down in zip(run.rounds, ups, downs):
        acc = _num(r.get(metric))
        if acc is not None:
            xs.append(up + down)
            ys.append(acc)
    return xs, ys


def bytes_per_node(run: RunData) -> dict[str, tuple[int, int]]:
    """Bytes up and down per client, from the comms summary or else comms.csv."""
    per_node = run.comms.get("per_node")
    if isinstance(per_node, dict) and per_node:
        return {str(n): (int(_num(v.get("up")) or 0), int(_num(v.get("down")) or 0))
                for n, v in per_node.items() if isinstance(v, dict)}
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in run.comms_rows or []:
        slot = 0 if row.get("direction") == "up" else 1
        totals[str(row.get("node"))][slot] += int(_num(row.get("bytes")) or 0)
    return {n: (u, d) for n, (u, d) in totals.items()}


def epsilon_per_round(run: RunData) -> tuple[list[int], list[float]]:
    """Rounds and the largest epsilon spent by any client by that round."""
    best: dict[int, float] = {}
    for row in run.privacy_rows or []:
        rnd, eps = _num(row.get("round")), _num(row.get("epsilon"))
        if rnd is None or eps is None:
            continue
        best[int(rnd)] = max(eps, best.get(int(rnd), -math.inf))
    rounds = sorted(best)
    return rounds, [best[r] for r in rounds]


def final_value(run: RunData, metric: str) -> float | None:
    """The last non-null value of a per-round metric."""
    for r in reversed(run.rounds):
        value = _num(r.get(metric))
        if value is not None:
            return value
    return None

