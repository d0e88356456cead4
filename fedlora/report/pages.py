"""The HTML pages: one run's, or the comparison of several runs side by side."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from .figures import plots
from .overhead import overhead_html
from .reading import RunData, _num
from .reply_keys import _count_reply_keys, audit_reply_keys
from .series import epsilon_per_round, final_value

HEADER_KEYS = ("task", "aggregator", "lora-rank", "wire-dtype", "num-server-rounds", "dp-mode")

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
                f"({distinct} distinct keys) is an adapter family's tensor (LoRA's "
                f"<code>.lora_A.weight</code>, <code>.lora_B.weight</code>, DoRA's magnitude, "
                f"VeRA's vectors) or a classification-head key.</p>")
    items = "".join(
        f"<li><code>{_e(key)}</code> in {len(where)} repl{'y' if len(where) == 1 else 'ies'} "
        f"(round/node: {_e(', '.join(f'{r}/{n}' for r, n in where[:5]))}"
        f"{', ...' if len(where) > 5 else ''})</li>"
        for key, where in sorted(others.items()))
    return (f"<p class=\"bad\">{len(others)} array key(s) in client replies are neither LoRA "
            f"factors nor head keys:</p><ul>{items}</ul>")


def _notes_html(run: RunData) -> str:
    """The rounds' one-line notes (a round that accepted no reply says why)."""
    items = [f"<li>{_e(r['note'])}</li>" for r in run.rounds if r.get("note")]
    return f"<h2>Rounds that changed nothing</h2><ul class=\"bad\">{''.join(items)}</ul>" \
        if items else ""


def _refused_html(run: RunData) -> str:
    items = [f"<li>round {_e(r.get('round'))}, node {_e(x.get('node'))}: {_e(x.get('reason'))}</li>"
             for r in run.rounds for x in (r.get("refused") or []) if isinstance(x, dict)]
    if not items:
        return ""
    return f"<h2>Refused replies</h2><ul>{''.join(items)}</ul>"


def _confusion_html(run: RunData) -> str:
    """The confusion matrix of the centralised test set (``evaluation.json``: the run's last
    centralised evaluation, or ``fedlora evaluate RUN_DIR``)."""
    m = run.evaluation
    if not m:
        return ("<h2>Confusion matrix</h2><p class=\"muted\">Run <code>fedlora evaluate "
                "RUN_DIR</code> to add the confusion matrix of the centralised test set.</p>")
    when = f" after round {_e(m['round'])}" if isinstance(m.get("round"), int) else ""
    labels = [str(x) for x in m.get("labels") or []]
    head = "".join(f"<th>{_e(n)}</th>" for n in labels)
    rows = "".join(f"<tr><th>{_e(n)}</th>" + "".join(f"<td class=\"num\">{_e(v)}</td>"
                                                    for v in row) + "</tr>"
                   for n, row in zip(labels, m["confusion_matrix"]))
    return (f"<h2>Confusion matrix</h2><p>Centralised test set{when}, "
            f"{_e(m.get('examples', '-'))} "
            f"examples, accuracy {_fmt_float(m.get('accuracy'))} (rows: true label, columns: "
            f"predicted).</p><table><tr><th></th>{head}</tr>{rows}</table>")


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


def _causal(run: RunData) -> bool:
    return any("test_perplexity" in r for r in run.rounds)


def render_run_page(run: RunData) -> str:
    """The HTML page of one run."""
    body = (f"<h1>fedlora run {_e(run.name)}</h1>"
            f"<p class=\"muted\">{_e(run.path.resolve())}</p>{_config_header(run)}"
            f"<h2>Summary</h2>{_summary_table(run)}{overhead_html([run])}"
            f"<h2>Audit of client replies</h2>{audit_html(run)}"
            f"{_notes_html(run)}{_refused_html(run)}"
            f"{'' if _causal(run) else _confusion_html(run)}"
            f"<h2>Plots</h2>{_dp_note([run])}{_figures_html([run])}")
    return _page(f"fedlora run {run.name}", body)


def render_comparison_page(runs: Sequence[RunData]) -> str:
    """One HTML page comparing several runs: overlaid plots and a side-by-side table."""
    names = ", ".join(r.name for r in runs)
    audits = "".join(f"<h3>{_e(r.name)}</h3>{audit_html(r)}" for r in runs)
    body = (f"<h1>fedlora comparison of {len(runs)} runs</h1><p>{_e(names)}</p>"
            f"<h2>Summary</h2>{_comparison_table(runs)}{overhead_html(runs)}"
            f"<h2>Audit of client replies</h2>{audits}"
            f"<h2>Plots</h2>{_dp_note(runs)}{_figures_html(runs)}")
    return _page(f"fedlora comparison: {names}", body)
