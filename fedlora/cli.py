"""The ``fedlora`` command line.

``fedlora report RUN_DIR [RUN_DIR ...] [-o OUT.html]`` writes a self-contained HTML report of
one run (default ``RUN_DIR/report.html``) or a comparison page of several
(default ``./fedlora-comparison.html``) and prints the path it wrote.

``fedlora certs DIR --host HOST [--host HOST ...]`` creates a CA and the SuperLink's TLS
certificate; ``fedlora node-key PATH`` creates a SuperNode's authentication key pair
(see docs/deploy.md).

``fedlora export RUN_DIR OUT [--merged]`` writes a run's model as a transformers folder;
``fedlora predict RUN_DIR|MODEL_DIR (--text TEXT | --file FILE)`` prints a label and its
probability (or a continuation) per input; ``fedlora evaluate RUN_DIR|MODEL_DIR [--data FILE]``
prints and writes accuracy, per-class precision/recall/F1 and the confusion matrix
(perplexity for a causal LM).
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


def _cmd_certs(args: argparse.Namespace) -> int:
    from .deploy import DeployError, make_certificates

    try:
        paths = make_certificates(args.out_dir, args.host, days=args.days, force=args.force)
    except DeployError as e:
        print(f"fedlora certs: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"CA certificate (give to every SuperNode and flwr user): {paths.ca_cert}")
    print(f"CA key (keep offline):                                  {paths.ca_key}")
    print(f"SuperLink certificate ({', '.join(args.host)}): {paths.server_cert}")
    print(f"SuperLink key:                                         {paths.server_key}")
    return EXIT_OK


def _cmd_node_key(args: argparse.Namespace) -> int:
    from .deploy import DeployError, make_node_key

    try:
        private, public = make_node_key(args.path, comment=args.comment, force=args.force)
    except DeployError as e:
        print(f"fedlora node-key: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"private key (stays on the site): {private}")
    print(f"public key (register it: flwr supernode register {public} <connection>): {public}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedlora",
        description="Federated LoRA fine-tuning: run reports, deployment credentials, and "
                    "using the trained model (export, predict, evaluate).")
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

    certs = sub.add_parser(
        "certs", help="create a CA and the SuperLink's TLS certificate",
        description="Create ca.crt/ca.key and server.crt/server.key (signed by the CA, valid "
                    "for every --host) in OUT_DIR.")
    certs.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the files into")
    certs.add_argument("--host", action="append", required=True,
                       help="DNS name or IP address SuperNodes use to reach the SuperLink "
                            "(repeat for several)")
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    certs.add_argument("--force", action="store_true", help="overwrite existing files")
    certs.set_defaults(handler=_cmd_certs)

    node_key = sub.add_parser(
        "node-key", help="create a SuperNode's authentication key pair (ECDSA P-384, OpenSSH)",
        description="Write PATH (private key, stays on the site) and PATH.pub (to register "
                    "with `flwr supernode register PATH.pub <connection>`).")
    node_key.add_argument("path", metavar="PATH", help="private key file to create")
    node_key.add_argument("--comment", default="", help="comment appended to the public key")
    node_key.add_argument("--force", action="store_true", help="overwrite existing files")
    node_key.set_defaults(handler=_cmd_node_key)
    from .use_cli import add_use_commands

    add_use_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedlora`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
