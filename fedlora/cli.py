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
import json
import sys
from collections.abc import Sequence
from pathlib import Path

# Each subcommand imports what it runs when it runs (deferred on purpose): `fedlora --help`,
# `certs` and `node-key` start without loading torch or transformers.

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


# --------------------------------------------------------------- using what a run trained
# export, predict and evaluate: bad input exits with code 2 and one line naming the bad
# path, key or value.

def _use_errors() -> tuple[type[Exception], ...]:
    from .config import ConfigError
    from .data import DataError
    from .export import ExportError

    return ExportError, DataError, ConfigError


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    try:
        out = export_run(args.run_dir, args.out, merged=args.merged)
    except _use_errors() as e:
        print(f"fedlora export: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(out)
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import Predictor, read_input_texts

    try:
        texts = list(args.text or []) or read_input_texts(args.file,
                                                          text_column=args.text_column)
        predictor = Predictor.load(args.model)
        if predictor.causal_lm:
            outputs = predictor.generate(texts, max_new_tokens=args.max_new_tokens)
            rows = [{"text": t, "generated": g} for t, g in zip(texts, outputs)]
        else:
            rows = [{"text": t, "label": p.label, "probability": p.probability,
                     "probabilities": p.probabilities}
                    for t, p in zip(texts, predictor.classify(texts))]
    except _use_errors() as e:
        print(f"fedlora predict: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for row in rows:
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        elif "generated" in row:
            print(json.dumps(row["generated"], ensure_ascii=False))
        else:
            print(f"{row['label']}\t{row['probability']:.4f}")
    return EXIT_OK


def _format_evaluation(m: dict) -> str:
    if "perplexity" in m:
        return (f"{m['examples']} texts: perplexity {m['perplexity']:.3f}, token loss "
                f"{m['token_loss']:.4f}, next-token accuracy {m['next_token_accuracy']:.4f}")
    names = m["labels"]
    width = max(len(n) for n in [*names, "label"]) + 2
    lines = [f"{m['examples']} examples: accuracy {m['accuracy']:.4f}, macro F1 "
             f"{m['macro_f1']:.4f}", "",
             f"{'label':<{width}}precision  recall      f1  support"]
    for name in names:
        c = m["per_class"][name]
        lines.append(f"{name:<{width}}{c['precision']:9.4f}{c['recall']:8.4f}{c['f1']:8.4f}"
                     f"{c['support']:9d}")
    lines += ["", "confusion matrix (rows: true label, columns: predicted)",
              " " * width + "".join(f"{n[:10]:>11}" for n in names)]
    for name, row in zip(names, m["confusion_matrix"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>11d}" for v in row))
    return "\n".join(lines)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .export import is_run_dir
    from .predict import Predictor, evaluate_file
    from .results import write_json

    run_dir = args.model if is_run_dir(args.model) else None
    try:
        if args.data is None and run_dir is None:
            raise ValueError(f"'{args.model}' is not a run folder: give --data FILE")
        predictor = Predictor.load(args.model)
        metrics = evaluate_file(predictor, args.data, text_column=args.text_column,
                                label_column=args.label_column, run_dir=run_dir)
    except (*_use_errors(), ValueError) as e:
        print(f"fedlora evaluate: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.output) if args.output else (
        Path(run_dir) / "evaluation.json" if args.data is None else
        (Path(run_dir) / "evaluations" if run_dir else Path("."))
        / f"{Path(args.data).stem}.evaluation.json")
    print(_format_evaluation(metrics))
    try:
        write_json(out, metrics)
    except OSError as e:
        print(f"fedlora evaluate: error: cannot write {out}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"written to {out}")
    if run_dir is not None and args.data is None and args.output is None:
        _refresh_report(run_dir)
    return EXIT_OK


def _refresh_report(run_dir: str) -> None:
    """Redraw the run's report, which shows the confusion matrix just written."""
    from .report import ReportError, write_report

    try:
        print(f"report: {write_report([run_dir])}")
    except (ReportError, OSError) as e:
        print(f"fedlora evaluate: could not redraw the report: {e}", file=sys.stderr)


def add_use_commands(sub) -> None:
    """Add the export, predict and evaluate subparsers to ``sub``."""
    export = sub.add_parser(
        "export", help="write a run's model as a transformers folder",
        description="Write the model of RUN_DIR to OUT (a new folder): the peft adapter with "
                    "the base model named by local path, or with --merged the adapter folded "
                    "into the base weights as a plain transformers model; both with the "
                    "tokenizer and the label names.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (with adapter/)")
    export.add_argument("out", metavar="OUT", help="the folder to create")
    export.add_argument("--merged", action="store_true",
                        help="fold the LoRA update (alpha/r * B @ A) into the base weights")
    export.set_defaults(handler=_cmd_export)

    predict = sub.add_parser(
        "predict", help="label (and probability) or continuation of each input text",
        description="One line per input: label and probability (classifier) or the "
                    "continuation (causal LM); one JSON object per line with --json.")
    predict.add_argument("model", metavar="RUN_DIR|MODEL_DIR")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="an input text (repeatable)")
    source.add_argument("--file", metavar="FILE",
                        help="inputs: .txt (one per line) or .csv/.jsonl (--text-column)")
    predict.add_argument("--text-column", default="text")
    predict.add_argument("--max-new-tokens", type=int, default=40,
                         help="tokens to generate (causal LM; default 40)")
    predict.add_argument("--json", action="store_true", help="JSON lines output")
    predict.set_defaults(handler=_cmd_predict)

    evaluate = sub.add_parser(
        "evaluate", help="accuracy, per-class precision/recall/F1, confusion matrix",
        description="Evaluate on a labelled CSV/JSONL file (texts for a causal LM: "
                    "perplexity), or without --data on the run's own centralised test set; "
                    "print the metrics and write them as JSON.")
    evaluate.add_argument("model", metavar="RUN_DIR|MODEL_DIR")
    evaluate.add_argument("--data", metavar="FILE", default=None,
                          help="labelled .csv/.jsonl (default: the run's test set)")
    evaluate.add_argument("--text-column", default="text")
    evaluate.add_argument("--label-column", default="label")
    evaluate.add_argument("-o", "--output", metavar="OUT.json", default=None,
                          help="default: RUN_DIR/evaluation.json (run's test set), "
                               "RUN_DIR/evaluations/<data>.evaluation.json, or "
                               "./<data>.evaluation.json for a model folder")
    evaluate.set_defaults(handler=_cmd_evaluate)


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
    add_use_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedlora`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
