"""What secure aggregation costs a run against the same run without it: bytes per site per
round, each way, and seconds per round, of each and their ratio.

A run aggregates securely when its config says ``secure-aggregation = true``. On a
comparison page each such run is set against the plain run (given on the same command
line) whose config differs from it in the fewest keys besides secure aggregation's own; the
keys in which they still differ are named, since they change the figures too. A site's
bytes per round are the round's bytes (``metrics.json``: ``bytes_up``, ``bytes_down``)
over the sites it sampled, averaged over the training rounds; seconds per round are the
rounds' ``round_seconds``. The secure run's bytes are also split by protocol stage
(``comms.csv``, kinds ``secagg_*``; the adapter it broadcasts counts as ``train``).
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from .reading import RunData, _num

__all__ = ["Costs", "baseline_for", "costs", "overhead_html", "stage_bytes"]

#: Config keys that belong to secure aggregation (or only name the run): not a difference.
OWN_KEYS = ("secure-aggregation", "run-name", "output-dir")
OWN_PREFIX = "secagg-"
STAGE_ORDER = ("train", "secagg_setup", "secagg_advertise", "secagg_share_keys",
               "secagg_masked_input", "secagg_consistency", "secagg_unmask")


def is_secure(run: RunData) -> bool:
    value = run.config.get("secure-aggregation")
    return value is True or str(value).lower() == "true"


@dataclass(frozen=True)
class Costs:
    """A run's mean bytes per site per training round, each way, and seconds per round."""

    up: float | None
    down: float | None
    seconds: float | None
    rounds: int


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def costs(run: RunData) -> Costs:
    """:class:`Costs` over the run's training rounds (round 0, the evaluation of the
    initial adapter, is left out; so is a round that sampled no site)."""
    up, down, seconds = [], [], []
    for r in run.rounds:
        sampled = _num(r.get("clients_sampled"))
        if (_num(r.get("round")) or 0) < 1 or not sampled:
            continue
        for out, key in ((up, "bytes_up"), (down, "bytes_down")):
            value = _num(r.get(key))
            if value is not None:
                out.append(value / sampled)
        value = _num(r.get("round_seconds"))
        if value is not None:
            seconds.append(value)
    return Costs(_mean(up), _mean(down), _mean(seconds), len(up))


def _differences(a: RunData, b: RunData) -> list[str]:
    keys = set(a.config) | set(b.config)
    return sorted(k for k in keys if k not in OWN_KEYS and not k.startswith(OWN_PREFIX)
                  and a.config.get(k) != b.config.get(k))


def baseline_for(run: RunData, runs: Sequence[RunData]) -> tuple[RunData, list[str]] | None:
    """The plain run among ``runs`` most like ``run`` and the config keys in which they
    still differ, or None when every run aggregates securely."""
    plain = [r for r in runs if not is_secure(r)]
    if not plain:
        return None
    best = min(plain, key=lambda r: len(_differences(run, r)))
    return best, _differences(run, best)


def stage_bytes(run: RunData) -> dict[str, tuple[float, float]]:
    """Mean bytes per site per training round, up and down, by message kind
    (``comms.csv``); empty without one."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in run.comms_rows or []:
        value = _num(row.get("bytes"))
        if value is None or (_num(row.get("round")) or 0) < 1:
            continue
        totals[row.get("kind", "")][row.get("direction") == "down"] += int(value)
    site_rounds = sum(int(_num(r.get("clients_sampled")) or 0) for r in run.rounds
                      if (_num(r.get("round")) or 0) >= 1)
    if not site_rounds:
        return {}
    order = {k: i for i, k in enumerate(STAGE_ORDER)}
    return {kind: (up / site_rounds, down / site_rounds)
            for kind, (up, down) in sorted(totals.items(),
                                           key=lambda kv: (order.get(kv[0], 99), kv[0]))}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _pair_rows(secure: RunData, plain: RunData) -> str:
    s, p = costs(secure), costs(plain)
    rows = []
    for label, a, b, spec in (("bytes up per site per round", s.up, p.up, ",.0f"),
                              ("bytes down per site per round", s.down, p.down, ",.0f"),
                              ("seconds per round", s.seconds, p.seconds, ".1f")):
        rows.append(f"<tr><th>{_e(label)}</th><td class=\"num\">{_fmt(a, spec)}</td>"
                    f"<td class=\"num\">{_fmt(b, spec)}</td>"
                    f"<td class=\"num\">{_ratio(a, b)}</td></tr>")
    return "".join(rows)


def _stages_html(run: RunData) -> str:
    stages = stage_bytes(run)
    if not stages:
        return ""
    rows = "".join(f"<tr><th><code>{_e(kind)}</code></th><td class=\"num\">{up:,.0f}</td>"
                   f"<td class=\"num\">{down:,.0f}</td></tr>"
                   for kind, (up, down) in stages.items())
    exact = run.comms.get("measured_equals_analytic")
    check = "" if exact is None else (
        "<p class=\"ok\">Every message's bytes equal its formula.</p>" if exact else
        "<p class=\"bad\">Some message's bytes differ from its formula (comms.csv: bytes "
        "against analytic_bytes).</p>")
    return (f"<p>{_e(run.name)}: bytes per site per round by message kind.</p><table><tr>"
            f"<th>kind</th><th>up</th><th>down</th></tr>{rows}</table>{check}")


def overhead_html(runs: Sequence[RunData]) -> str:
    """The section "Secure aggregation overhead" of a page of ``runs`` ("" when none
    aggregates securely)."""
    secure = [r for r in runs if is_secure(r)]
    if not secure:
        return ""
    parts = ["<h2>Secure aggregation overhead</h2>"]
    for run in secure:
        found = baseline_for(run, runs)
        if found is None:
            c = costs(run)
            parts.append(
                f"<p>{_e(run.name)}: {_fmt(c.up, ',.0f')} bytes up and {_fmt(c.down, ',.0f')} "
                f"bytes down per site per round, {_fmt(c.seconds, '.1f')} s per round. Give "
                f"the same run without secure aggregation too (<code>fedlora report "
                f"{_e(run.path)} PLAIN_RUN</code>) to see the overhead against it.</p>")
        else:
            plain, differ = found
            note = (f"<p class=\"muted\">The runs also differ in: "
                    f"{_e(', '.join(differ))}.</p>") if differ else ""
            parts.append(
                f"<table><tr><th></th><th>{_e(run.name)} (secure aggregation)</th><th>"
                f"{_e(plain.name)} (without)</th><th>ratio</th></tr>{_pair_rows(run, plain)}</table>{note}")
        parts.append(_stages_html(run))
    return "".join(parts)
