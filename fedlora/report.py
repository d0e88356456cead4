"""A self-contained HTML report of one run folder, or a comparison page of several.

The page reads what a run writes (``metrics.json``, ``comms.json``, ``comms.csv`` and,
when differential privacy was on, ``privacy.csv``) and embeds its plots as base64 PNG
data URIs, so the single HTML file can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "ReportError",
    "RunData",
    "load_run",
    "audit_reply_keys",
    "render_run_page",
    "render_comparison_page",
    "default_output",
    "write_report",
]

FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
HEAD_MODULES = ("classifier", "score", "classification_head")
HEADER_KEYS = ("task", "aggregator", "lora-rank", "wire-dtype", "num-server-rounds", "dp-mode")


class ReportError(ValueError):
    """A folder that cannot be reported on (not a run folder, unreadable results)."""


@dataclass(frozen=True)
class RunData:
    """What the report needs from one run folder."""

    path: Path
    name: str
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    comms: dict[str, Any]
    comms_rows: list[dict[str, str]] | None
    privacy_rows: list[dict[str, str]] | None


# ---------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    """Parse a JSON file, turning any failure into a :class:`ReportError` naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"cannot read {path}: {e}") from None


def _read_csv(path: Path) -> list[dict[str, str]] | None:
    """Rows of a CSV file as dicts, or ``None`` when the file does not exist."""
    if not path.is_file():
        return None
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ReportError(f"cannot read {path}: {e}") from None


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Read a run folder; raise :class:`ReportError` when it is not one."""
    folder = Path(path)
    if not folder.is_dir():
        raise ReportError(f"'{folder}' is not a run folder: no such directory")
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise ReportError(f"'{folder}' is not a run folder: it has no metrics.json")
    metrics = _read_json(metrics_path)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("rounds"), list):
        raise ReportError(f"'{metrics_path}' is not a run's metrics.json: no 'rounds' list")
    config = metrics.get("config")
    if not isinstance(config, dict) and (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
    comms = metrics.get("comms")
    if (folder / "comms.json").is_file():
        comms = _read_json(folder / "comms.json")
    rounds = [r for r in metrics["rounds"] if isinstance(r, dict)]
    return RunData(
        path=folder,
        name=name or folder.resolve().name,
        config=config if isinstance(config, dict) else {},
        rounds=sorted(rounds, key=lambda r: _num(r.get("round")) or 0),
        comms=comms if isinstance(comms, dict) else {},
        comms_rows=_read_csv(folder / "comms.csv"),
        privacy_rows=_read_csv(folder / "privacy.csv"),
    )


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, with the parent prepended where two runs share a name."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]


def load_runs(paths: Sequence[str | Path]) -> list[RunData]:
    """Read several run folders, naming them so a legend can tell them apart."""
    folders = [Path(p) for p in paths]
    for folder in folders:
        load_run(folder)  # fail on the first bad folder, before anything is drawn
    return [load_run(p, n) for p, n in zip(folders, _unique_names(folders))]


# ---------------------------------------------------------------------------- numbers


def _num(value: Any) -> float | None:
    """A finite float from a JSON or CSV value, else ``None``."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


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


# ---------------------------------------------------------------------------- audit


def is_head_key(key: str) -> bool:
    """True for a classification-head tensor key (``...classifier.weight``, ``...score.bias``)."""
    parts = key.split(".")
    return parts[-1] in ("weight", "bias") and any(p in HEAD_MODULES for p in parts[:-1])


def audit_reply_keys(rows: Iterable[Mapping[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Keys in client replies (``direction == "up"``) that are neither LoRA factors nor head.

    Returns each such key with the (round, node) pairs of the replies that carried it.
    """
    found: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in rows:
        if row.get("direction") != "up":
            continue
        for key in filter(None, (row.get("keys") or "").split(";")):
            if not key.endswith(FACTOR_SUFFIXES) and not is_head_key(key):
                found[key].append((str(row.get("round")), str(row.get("node"))))
    return dict(found)


def _count_reply_keys(rows: Iterable[Mapping[str, str]]) -> tuple[int, int]:
    """(replies, distinct keys) among the client replies of comms.csv."""
    replies, keys = 0, set()
    for row in rows:
        if row.get("direction") == "up":
            replies += 1
            keys.update(filter(None, (row.get("keys") or "").split(";")))
    return replies, len(keys)


# ---------------------------------------------------------------------------- plots


def _figure(title: str, xlabel: str, ylabel: str, width: float = 9.0, height: float = 4.2):
    """A Figure (Agg canvas, no pyplot state) with one titled, labelled axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _bytes_axis(axis) -> None:
    """Label an axis in engineering units of bytes (kB, MB, GB)."""
    from matplotlib.ticker import EngFormatter

    axis.set_major_formatter(EngFormatter(unit="B"))


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _legend_or_note(ax, drawn: bool, empty_note: str) -> None:
    """A legend for a plot with data, a note saying what is missing otherwise."""
    if drawn:
        ax.legend(fontsize="small")
    else:
        _no_data(ax, empty_note)


def _png_data_uri(fig) -> str:
    """Render a Figure to a ``data:image/png;base64,...`` URI."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _color(i: int) -> str:
    return f"C{i % 10}"


def plot_cumulative_bytes(runs: Sequence[RunData]) -> str:
    """Cumulative bytes up (solid) and down (dashed) per round."""
    fig, ax = _figure("Cumulative bytes per round", "round", "cumulative bytes")
    for i, run in enumerate(runs):
        rounds, ups, downs = cumulative_bytes(run)
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        ax.plot(rounds, ups, "-o", color=_color(i), label=f"{prefix}up (client to server)")
        ax.plot(rounds, downs, "--s", color=_color(i) if len(runs) > 1 else "C1",
                label=f"{prefix}down (server to client)")
    _bytes_axis(ax.yaxis)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize="small")
    return _png_data_uri(fig)


def _short_node(node: str) -> str:
    return node if len(node) <= 8 else "\u2026" + node[-6:]


def plot_bytes_per_client(runs: Sequence[RunData]) -> str:
    """Bytes per client: up and down per node for one run; totals, sorted, for several."""
    if len(runs) == 1:
        return _plot_bytes_per_node(runs[0])
    fig, ax = _figure("Bytes per client (up + down), clients sorted by bytes",
                      "client (rank by bytes)", "bytes")
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        totals = sorted((u + d for u, d in bytes_per_node(run).values()), reverse=True)
        xs = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(totals))]
        ax.bar(xs, totals, width=width, color=_color(i), label=run.name)
    _bytes_axis(ax.yaxis)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize="small")
    if not any(bytes_per_node(r) for r in runs):
        _no_data(ax, "no per-client bytes recorded")
    return _png_data_uri(fig)


def _plot_bytes_per_node(run: RunData) -> str:
    per_node = bytes_per_node(run)
    fig, ax = _figure("Bytes per client", "client (node id)", "bytes")
    nodes = sorted(per_node, key=lambda n: (-sum(per_node[n]), n))
    xs = range(len(nodes))
    ax.bar([x - 0.2 for x in xs], [per_node[n][0] for n in nodes], width=0.4, label="up")
    ax.bar([x + 0.2 for x in xs], [per_node[n][1] for n in nodes], width=0.4, label="down")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_short_node(n) for n in nodes], rotation=60 if len(nodes) > 6 else 0,
                       fontsize="small")
    _bytes_axis(ax.yaxis)
    _legend_or_note(ax, bool(nodes), "no per-client bytes recorded")
    return _png_data_uri(fig)


def plot_accuracy_vs_bytes(runs: Sequence[RunData]) -> str:
    """Accuracy after each round against the cumulative bytes (up + down) so far."""
    metrics = {accuracy_metric(r) for r in runs}
    label = "test accuracy" if metrics == {"test_accuracy"} else "accuracy (test, else fed-eval)"
    fig, ax = _figure(f"{label.capitalize()} against cumulative bytes",
                      "cumulative bytes (up + down)", label)
    drawn = False
    for i, run in enumerate(runs):
        xs, ys = accuracy_vs_bytes(run, accuracy_metric(run))
        if xs:
            ax.plot(xs, ys, "-o", color=_color(i), label=run.name)
            drawn = True
    _bytes_axis(ax.xaxis)
    _legend_or_note(ax, bool(drawn), "no accuracy recorded")
    return _png_data_uri(fig)


def plot_epsilon(runs: Sequence[RunData]) -> str:
    """Largest epsilon over the clients, per round, for runs with a privacy.csv."""
    fig, ax = _figure("Privacy spent: max epsilon over clients", "round", "epsilon")
    drawn = False
    for i, run in enumerate(runs):
        rounds, eps = epsilon_per_round(run)
        if rounds:
            ax.plot(rounds, eps, "-o", color=_color(i), label=run.name)
            drawn = True
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend_or_note(ax, bool(drawn), "privacy.csv has no epsilon values")
    return _png_data_uri(fig)


def plots(runs: Sequence[RunData]) -> list[tuple[str, str]]:
    """(caption, data URI) of every plot for these runs; epsilon only where DP was on."""
    out = [
        ("Cumulative bytes up and down per round", plot_cumulative_bytes(runs)),
        ("Bytes per client", plot_bytes_per_client(runs)),
        ("Accuracy against cumulative bytes (up + down)", plot_accuracy_vs_bytes(runs)),
    ]
    if any(r.privacy_rows is not None for r in runs):
        out.append(("Max epsilon over clients per round", plot_epsilon(runs)))
    return out


# ---------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.wide table{font-size:.85em}
.config span{display:inline-block;margin:0 .8em .3em 0;padding:.15em .5em;background:#eef3fa;
border-radius:4px}
.ok{color:#17702a;font-weight:600}.bad{color:#b00020;font-weight:600}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}code{font-size:.9em}.muted{color:#666}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt_bytes(value: Any, compact: bool = False) -> str:
    """``9,535,744 B (9.54 MB)``, or just ``9.54 MB`` when compact."""
    x = _num(value)
    if x is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= size:
            short = f"{x / size:.2f} {unit}"
            return short if compact else f"{int(x):,} B ({short})"
    return f"{int(x):,} B"


def _fmt_ratio(value: Any) -> str:
    x = _num(value)
    if x is None or x <= 0:
        return "-"
    return f"{x:.4%} (1 : {1 / x:,.0f})"


def _fmt_float(value: Any, spec: str = ".4f") -> str:
    x = _num(value)
    return "-" if x is None else format(x, spec)


def _fmt_bool(value: Any) -> str:
    if value is None:
        return "-"
    return "yes" if value else "NO"


def _last_round(run: RunData) -> int:
    return int(_num(run.rounds[-1].get("round")) or 0) if run.rounds else 0


def summary_items(run: RunData, compact: bool = False) -> list[tuple[str, str]]:
    """(label, formatted value) rows of a run's summary table (compact: short byte counts)."""
    total = run.comms.get("total_bytes") or {}
    planned = run.config.get("num-server-rounds", "?")
    refused = sum(int(_num(r.get("clients_refused")) or 0) for r in run.rounds)
    _, eps = epsilon_per_round(run)
    return [
        ("Rounds completed", f"{_last_round(run)} of {planned}"),
        ("Total bytes up (client to server)", _fmt_bytes(total.get("up"), compact)),
        ("Total bytes down (server to client)", _fmt_bytes(total.get("down"), compact)),
        ("Messages", str(run.comms.get("messages", "-"))),
        ("Bytes per client update",
         _fmt_bytes(run.comms.get("bytes_per_client_update"), compact)),
        ("Full model (float32)", _fmt_bytes(run.comms.get("full_model_bytes"), compact)),
        ("Update / full fine-tuning", _fmt_ratio(run.comms.get("ratio_update_to_full_model"))),
        ("Measured bytes == analytic", _fmt_bool(run.comms.get("measured_equals_analytic"))),
        ("Initial test accuracy", _fmt_float(run.rounds[0].get("test_accuracy")
                                             if run.rounds else None)),
        ("Final test accuracy", _fmt_float(final_value(run, "test_accuracy"))),
        ("Final fed-eval accuracy", _fmt_float(final_value(run, "fed_eval_accuracy"))),
        ("Replies refused", str(refused)),
        ("Wall time", _fmt_float(final_value(run, "elapsed_seconds"), ".1f") + " s"),
        ("Max epsilon", _fmt_float(max(eps), ".3f") if eps else "DP was off"),
    ]


def _summary_table(run: RunData) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td class=\"num\">{_e(v)}</td></tr>"
                   for k, v in summary_items(run))
    return f"<table>{rows}</table>"


def _comparison_table(runs: Sequence[RunData]) -> str:
    cfg_keys = [k for k in HEADER_KEYS if any(k in r.config for r in runs)]
    labels = [_header_label(k) for k in cfg_keys] + [k for k, _ in summary_items(runs[0])]
    head = "".join(f"<th>{_e(h)}</th>" for h in ["run", *labels])
    body = []
    for run in runs:
        cells = [f"<th>{_e(run.name)}</th>"]
        cells += [f"<td>{_e(run.config.get(k, '-'))}</td>" for k in cfg_keys]
        cells += [f"<td class=\"num\">{_e(v)}</td>" for _, v in summary_items(run, True)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<div class=\"wide\" style=\"overflow-x:auto\"><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _header_label(key: str) -> str:
    return "rounds" if key == "num-server-rounds" else key


def _config_header(run: RunData) -> str:
    spans = []
    for key in HEADER_KEYS:
        if key in run.config:
            spans.append(f"<span><b>{_e(_header_label(key))}</b> {_e(run.config[key])}</span>")
    return f"<p class=\"config\">{''.join(spans)}</p>"


def audit_html(run: RunData) -> str:
    """One line: did client replies carry only LoRA factors and head, or which other keys."""
    if run.comms_rows is None:
        return "<p class=\"bad\">No comms.csv: the keys of client replies cannot be audited.</p>"
    replies, distinct = _count_reply_keys(run.comms_rows)
    others = audit_reply_keys(run.comms_rows)
    if not others:
        return (f"<p class=\"ok\">Every array key in the {replies} client replies "
                f"({distinct} distinct keys) is a LoRA factor (<code>.lora_A.weight</code>, "
                f"<code>.lora_B.weight</code>) or a classification-head key.</p>")
    items = "".join(
        f"<li><code>{_e(key)}</code> in {len(where)} repl{'y' if len(where) == 1 else 'ies'} "
        f"(round/node: {_e(', '.join(f'{r}/{n}' for r, n in where[:5]))}"
        f"{', ...' if len(where) > 5 else ''})</li>"
        for key, where in sorted(others.items()))
    return (f"<p class=\"bad\">{len(others)} array key(s) in client replies are neither LoRA "
            f"factors nor head keys:</p><ul>{items}</ul>")


def _refused_html(run: RunData) -> str:
    items = [f"<li>round {_e(r.get('round'))}, node {_e(x.get('node'))}: {_e(x.get('reason'))}</li>"
             for r in run.rounds for x in (r.get("refused") or []) if isinstance(x, dict)]
    if not items:
        return ""
    return f"<h2>Refused replies</h2><ul>{''.join(items)}</ul>"


def _dp_note(runs: Sequence[RunData]) -> str:
    off = [r.name for r in runs if r.privacy_rows is None]
    if not off:
        return ""
    if len(runs) == 1:
        return "<p class=\"muted\">DP was off: this run has no privacy.csv, so no epsilon plot.</p>"
    return (f"<p class=\"muted\">DP was off (no privacy.csv) in: {_e(', '.join(off))}.</p>")


def _figures_html(runs: Sequence[RunData]) -> str:
    return "".join(f"<figure><img alt=\"{_e(c)}\" src=\"{uri}\"><figcaption>{_e(c)}"
                   f"</figcaption></figure>" for c, uri in plots(runs))


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f"</body></html>\n")


def render_run_page(run: RunData) -> str:
    """The HTML page of one run."""
    body = (f"<h1>fedlora run {_e(run.name)}</h1>"
            f"<p class=\"muted\">{_e(run.path.resolve())}</p>{_config_header(run)}"
            f"<h2>Summary</h2>{_summary_table(run)}"
            f"<h2>Audit of client replies</h2>{audit_html(run)}"
            f"{_refused_html(run)}"
            f"<h2>Plots</h2>{_dp_note([run])}{_figures_html([run])}")
    return _page(f"fedlora run {run.name}", body)


def render_comparison_page(runs: Sequence[RunData]) -> str:
    """One HTML page comparing several runs: overlaid plots and a side-by-side table."""
    names = ", ".join(r.name for r in runs)
    audits = "".join(f"<h3>{_e(r.name)}</h3>{audit_html(r)}" for r in runs)
    body = (f"<h1>fedlora comparison of {len(runs)} runs</h1><p>{_e(names)}</p>"
            f"<h2>Summary</h2>{_comparison_table(runs)}"
            f"<h2>Audit of client replies</h2>{audits}"
            f"<h2>Plots</h2>{_dp_note(runs)}{_figures_html(runs)}")
    return _page(f"fedlora comparison: {names}", body)


def default_output(run_dirs: Sequence[str | Path]) -> Path:
    """``RUN_DIR/report.html`` for one run, ``./fedlora-comparison.html`` for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report.html"
    return Path("fedlora-comparison.html")


def _write_text(path: Path, text: str) -> None:
    """Write beside ``path`` then rename, so a reader never sees half a page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(run_dirs: Sequence[str | Path], output: str | Path | None = None) -> Path:
    """Render the report of one run (or the comparison of several) and write it; return the path."""
    if not run_dirs:
        raise ReportError("no run folder given")
    runs = load_runs(run_dirs)
    page = render_run_page(runs[0]) if len(runs) == 1 else render_comparison_page(runs)
    out = Path(output) if output is not None else default_output(run_dirs)
    _write_text(out, page)
    log.debug("report of %d run(s) written to %s", len(runs), out)
    return out
