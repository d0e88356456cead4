"""Run fedlora in-process with Flower's simulation engine (for sweeps, benchmarks and tests).

``flwr run .`` is the way to run the app; this module drives the same ServerApp and
ClientApp through :func:`flwr.simulation.run_simulation` so that a Python program can
run many configurations, give virtual nodes their own node-config (e.g. heterogeneous
``lora-rank``) and read the results folder back.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context

log = logging.getLogger(__name__)

__all__ = ["comparison_args", "node_config_mod", "parse_comparison", "parse_sets",
           "read_metrics", "run_inprocess"]


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["lora-rank=4", "task=custom"]`` -> run-config overrides (values parsed as TOML)."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def node_config_mod(per_partition: Callable[[int], Mapping[str, Any]]):
    """A client mod that adds node-config entries chosen by the node's partition-id
    (in deployment each SuperNode has its own ``--node-config``)."""

    def mod(msg, context, call_next):
        pid = int(context.node_config.get("partition-id", 0))
        extra = dict(per_partition(pid))
        if extra:
            context = Context(run_id=context.run_id, node_id=context.node_id,
                              node_config={**dict(context.node_config), **extra},
                              state=context.state, run_config=context.run_config)
        return call_next(msg, context)

    return mod


def run_inprocess(
    overrides: Mapping[str, Any],
    *,
    num_nodes: int,
    cpus_per_client: float = 1,
    node_ranks: Sequence[int] | None = None,
    mods: list | None = None,
    total_cpus: int | None = None,
) -> Path:
    """Run one federated fine-tuning in this process; returns its results folder.

    ``node_ranks[i % len(node_ranks)]`` is the ``lora-rank`` of the node with partition-id i.
    """
    from flwr.simulation import run_simulation

    from fedlora.app.client.client_app import build_app as client_app
    from fedlora.app.server.server_app import build_app as server_app

    if "run-name" not in overrides or not overrides["run-name"]:
        raise ValueError("run_inprocess needs a 'run-name' so that it can find the results")
    mods = list(mods or [])
    if node_ranks:
        ranks = list(node_ranks)
        mods.insert(0, node_config_mod(lambda pid: {"lora-rank": ranks[pid % len(ranks)]}))
    init_args: dict[str, Any] = {"include_dashboard": False}
    if total_cpus:
        init_args["num_cpus"] = total_cpus
    run_simulation(
        server_app=server_app(overrides),
        client_app=client_app(overrides, mods=mods),
        num_supernodes=num_nodes,
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                        "init_args": init_args},
    )
    return Path(overrides.get("output-dir", "results")) / str(overrides["run-name"])


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """The metrics.json of a finished run."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def comparison_args(description: str, out: Path) -> argparse.ArgumentParser:
    """The options every comparison of runs shares: rounds, clients, local steps, the output
    folder (``out`` by default), ``--quick`` and repeatable ``--set KEY=VALUE``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra run-config entries for every run (repeatable)")
    return ap


def parse_comparison(ap: argparse.ArgumentParser, argv: Sequence[str] | None
                     ) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parsed options (``--quick`` caps rounds at 2 and local steps at 3; the output folder
    made) and the ``--set`` overrides."""
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.rounds, args.local_steps = min(args.rounds, 2), min(args.local_steps, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    return args, parse_sets(args.set)
