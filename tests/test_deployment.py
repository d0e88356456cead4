"""A real deployment on 127.0.0.1: SuperLink + SuperNodes as processes, `flwr run` against it."""

from __future__ import annotations

import csv
import json
import os

import pytest

from simulations.local_federation import LocalFederation, default_node_configs

pytestmark = pytest.mark.slow


def test_two_sites_run_and_flower_counts_the_same_bytes(tmp_path):
    configs = default_node_configs(2, tmp_path, None)
    out = tmp_path / "results"
    fed = LocalFederation(tmp_path, configs)
    try:
        fed.start()
        proc = fed.run(f"num-server-rounds=2 local-steps=2 fraction-train=1.0 "
                       f"fraction-evaluate=0.0 test-fraction=0.03 dp-mode='sample' "
                       f"target-epsilon=8.0 output-dir='{out}' run-name='sites'", timeout=900)
        runs = fed.runs()
    finally:
        fed.stop()
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # Every process we started, and everything they started, is gone.
    assert all(p.poll() is not None for _, p in fed.procs)
    assert not fed.alive_groups()

    run_dir = out / "sites"
    for name in ("metrics.json", "comms.csv", "comms.json", "privacy.csv",
                 "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    rows = list(csv.DictReader((run_dir / "privacy.csv").open()))
    assert len(rows) == 4 and all(0 < float(r["epsilon"]) <= 8.0 for r in rows)
    # Each site's ledger is on the site, in the file its node-config names.
    for cfg in configs:
        assert os.path.getsize(cfg["privacy-state-path"]) > 0

    comms = json.loads((run_dir / "comms.json").read_text())
    ours = comms["total_bytes"]["up"] + comms["total_bytes"]["down"]
    (run,) = runs
    flower = run["network-traffic"]["total-bytes"]
    # Flower counts whole messages (configs, metrics and framing too) but stores arrays
    # content-addressed, so identical arrays of a message (the all-zero B factors of the
    # initial adapter) travel once: over two rounds the totals agree within a few percent.
    print(f"flower {run['network-traffic']} ours up {comms['total_bytes']['up']} "
          f"down {comms['total_bytes']['down']}")
    assert abs(flower - ours) / ours < 0.08, (flower, ours)
