"""The ``fedlora`` command line.

``fedlora report RUN_DIR [RUN_DIR ...] [-o OUT.html]`` writes a self-contained HTML report of
one run (default ``RUN_DIR/report.html``) or a comparison page of several
(default ``./fedlora-comparison.html``) and prints the path it wrote.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _cmd_report(args: argparse.Namespace) -> int:
    """Write the report of ``args.run_dirs`` and print its path."""
    from .report import ReportError, write_report

    try:
        out = write_report(args.run_dirs, args.output)
    except ReportError as e:
        print(f"fedlora report: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"fedlora report: error: cannot write the report: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(out)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedlora", description="Federated LoRA fine-tuning: tools for run results.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    report = sub.add_parser(
        "report", help="write an HTML report of one run, or a comparison of several",
        description="Write a self-contained HTML report (plots embedded) of one run folder, "
                    "or one comparison page of several run folders.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a run folder (output-dir/<run-name>/ with metrics.json)")
    report.add_argument("-o", "--output", metavar="OUT.html", default=None,
                        help="where to write the page (default: RUN_DIR/report.html for one "
                             "run, ./fedlora-comparison.html for several)")
    report.set_defaults(handler=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedlora`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
