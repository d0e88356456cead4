"""How much one poisoning client hurts, with the server's reply checks on and off.

    python -m simulations.poisoning           # clean / attacked + checks / attacked, no checks

Five clients train every round on the default task; in the attacked runs client 0 sends
its adapter scaled by 1000 (a model-poisoning update). With the checks on
(``max-update-norm``) the server refuses it and says why; with ``max-update-norm = 0`` it
averages it in. Writes ``table.md`` and ``table.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulations.harness import parse_sets, read_metrics, run_inprocess  # noqa: E402


def scale_attack(factor: float, partition: int = 0):
    """A client mod: the client with ``partition`` sends its adapter times ``factor``."""

    def mod(msg, context, call_next):
        from fedlora.wire import from_record, to_record

        reply = call_next(msg, context)
        if (msg.metadata.message_type == "train" and "lora" in reply.content
                and int(context.node_config.get("partition-id", -1)) == partition):
            dtype = next(iter(reply.content["lora"].values())).dtype
            state = from_record(reply.content["lora"])
            reply.content["lora"] = to_record({k: v * factor for k, v in state.items()}, dtype)
        return reply

    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--factor", type=float, default=1000.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "poisoning")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    extra = parse_sets(args.set)
    runs = [("clean", {}, False), ("attacked, checks on", {}, True),
            ("attacked, checks off", {"max-update-norm": 0.0}, True)]
    rows = []
    for i, (label, cfg, attacked) in enumerate(runs):
        overrides = {**extra, "num-server-rounds": args.rounds, "fraction-train": 1.0,
                     "fraction-evaluate": 0.0, "output-dir": str(args.out),
                     "run-name": ["clean", "attacked-checked", "attacked-unchecked"][i], **cfg}
        run_dir = run_inprocess(overrides, num_nodes=args.clients,
                                mods=[scale_attack(args.factor)] if attacked else None)
        m = read_metrics(run_dir)
        refused = sum(r.get("clients_refused") or 0 for r in m["rounds"][1:])
        rows.append({"run": label, "test_accuracy": m["rounds"][-1]["test_accuracy"],
                     "refused_replies": refused, "run_dir": str(run_dir)})
        print(f"{label}: accuracy {rows[-1]['test_accuracy']:.4f}, refused {refused}", flush=True)
    lines = ["| run | test accuracy | refused replies |", "|---|---|---|"]
    lines += [f"| {r['run']} | {r['test_accuracy']:.4f} | {r['refused_replies']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
