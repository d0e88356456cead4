"""A self-contained HTML report of one run folder, or a comparison page of several.

The page reads what a run writes (``metrics.json``, ``comms.json``, ``comms.csv`` and,
when differential privacy was on, ``privacy.csv``) and embeds its plots as base64 PNG
data URIs, so the single HTML file can be mailed or archived on its own.

Modules: :mod:`.reading` (a run folder as :class:`RunData`), :mod:`.series` (the numbers
derived from it), :mod:`.reply_keys` (the keys of client replies), :mod:`.overhead` (what
secure aggregation costs against the same run without it), :mod:`.figures` (the plots) and
:mod:`.pages` (the HTML of one run or a comparison); this module writes the page.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..results import atomic_write_text
from .pages import render_comparison_page, render_run_page
from .reading import ReportError, RunData, load_run, load_runs
from .reply_keys import audit_reply_keys

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


def default_output(run_dirs: Sequence[str | Path]) -> Path:
    """``RUN_DIR/report.html`` for one run, ``./fedlora-comparison.html`` for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report.html"
    return Path("fedlora-comparison.html")


def write_report(run_dirs: Sequence[str | Path], output: str | Path | None = None) -> Path:
    """Render the report of one run (or the comparison of several) and write it; return the path."""
    if not run_dirs:
        raise ReportError("no run folder given")
    runs = load_runs(run_dirs)
    page = render_run_page(runs[0]) if len(runs) == 1 else render_comparison_page(runs)
    out = Path(output) if output is not None else default_output(run_dirs)
    atomic_write_text(out, page)
    log.debug("report of %d run(s) written to %s", len(runs), out)
    return out
