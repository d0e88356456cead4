"""One (pattern, N) configuration run in this process, its training exchanges timed."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flwr.app import Context

from .configs import pattern_app
from .rebuild import build_rebuild_app


class _TimedGrid:
    """A Grid that records the wall time and the outcome of every send_and_receive."""

    def __init__(self, grid: Any, records: list[dict]) -> None:
        self._grid = grid
        self._records = records

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        started = time.time()  # wall clock: matched against the GPU readings of the parent
        t0 = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        seconds = time.perf_counter() - t0
        ok, client_seconds = 0, []
        for r in replies:
            if r.has_error():
                continue
            status = r.content.get("status")
            if status is not None and status.get("status", "ok") != "ok":
                continue
            ok += 1
            m = r.content.get("metrics")
            if m is not None and "train-seconds" in m:
                client_seconds.append(float(m["train-seconds"]))
        kinds = sorted({m.metadata.message_type for m in messages})
        self._records.append({"kind": ",".join(kinds), "sent": len(messages), "ok": ok,
                              "seconds": seconds, "client_seconds": client_seconds,
                              "started": started, "ended": time.time()})
        return replies


def _client_timing_mod(msg, context, call_next):
    """Time each ClientApp call in its worker and put it in the reply as ``train-seconds``:
    the same measurement for both patterns (a private fedlora site itself releases no
    timing; in this benchmark the sites are simulated)."""
    t0 = time.perf_counter()
    reply = call_next(msg, context)
    metrics = None if reply.has_error() else reply.content.get("metrics")
    if metrics is not None:
        metrics["train-seconds"] = time.perf_counter() - t0
    return reply


def run_one(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run one (pattern, N) configuration in this process; returns its timings."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedlora.app.client.client_app import build_app as fedlora_client_app
    from fedlora.app.server.server_app import main as server_main
    from fedlora.protocol import with_overrides
    from simulations.harness import node_config_mod

    pattern, num_nodes = spec["pattern"], int(spec["nodes"])
    overrides = dict(spec["overrides"])
    partitions = int(overrides["num-partitions"])
    records: list[dict] = []

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        server_main(_TimedGrid(grid, records), with_overrides(context, overrides))

    # Virtual node i trains on partition i mod P: the same data per client for every N.
    mods = [node_config_mod(lambda pid: {"partition-id": pid % partitions}), _client_timing_mod]
    client_app = (fedlora_client_app(overrides, mods=mods) if pattern_app(pattern) == "fedlora"
                  else build_rebuild_app(overrides, mods=mods))
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_nodes,
        backend_config={"client_resources": {"num_cpus": float(spec["cpus_per_client"]),
                                             "num_gpus": float(spec.get("gpus_per_client",
                                                                        0.0))},
                        "init_args": {"include_dashboard": False,
                                      "num_cpus": int(spec["total_cpus"])}},
    )
    wall = time.perf_counter() - t0
    train = [r for r in records if r["kind"] == "train"]
    return {"pattern": pattern, "nodes": num_nodes, "rounds": train, "wall_seconds": wall}
