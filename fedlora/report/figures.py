"""The report's plots, drawn with matplotlib (no pyplot state) and returned as PNG data URIs."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from .reading import RunData
from .series import (
    accuracy_metric,
    accuracy_vs_bytes,
    bytes_per_node,
    cumulative_bytes,
    epsilon_per_round,
)


def _figure(title: str, xlabel: str, ylabel: str, width: float = 9.0, height: float = 4.2):
    """A Figure (Agg canvas, no pyplot state) with one titled, labelled axes."""
    # deferred: matplotlib is heavy and only the figures of a report need it
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
    from matplotlib.ticker import EngFormatter  # deferred, as in _figure

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

