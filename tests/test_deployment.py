"""A real deployment on 127.0.0.1: SuperLink + SuperNodes as processes, `flwr run` against it.

TLS (a CA and certificate from ``fedlora certs``) and SuperNode authentication (keys from
``fedlora node-key``, registered with ``flwr supernode register``) are on, as a site would
run them. Every process a test starts is stopped by its PID and process group, also when
the test fails.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time

import pytest

from simulations.local_federation import LocalFederation, default_node_configs

pytestmark = pytest.mark.slow

SMALL = ("local-steps=2 fraction-train=1.0 fraction-evaluate=0.0 test-fraction=0.03 "
         "min-train-nodes=1")


def _assert_all_stopped(fed: LocalFederation) -> None:
    assert all(p.poll() is not None for _, p in fed.procs)
    assert not fed.alive_groups()


POLICY = {"accept-dp-modes": "sample", "max-epsilon": 8.0, "max-delta": 1e-5}


def test_two_private_sites_with_tls_and_auth_refuse_a_weaker_run_and_run_theirs(tmp_path):
    """Each site's node-config policy accepts only dp-mode = sample up to epsilon 8: a run
    with dp-mode = off is refused by both (no reply accepted, the reason logged); a sample
    run at epsilon 4 runs, and Flower counts the same bytes as fedlora."""
    configs = default_node_configs(2, tmp_path, None, POLICY)
    out = tmp_path / "results"
    fed = LocalFederation(tmp_path, configs)
    try:
        t0 = time.monotonic()
        fed.start()
        refused = fed.run(f"num-server-rounds=1 {SMALL} dp-mode='off' output-dir='{out}' "
                          "run-name='weaker'", timeout=900)
        t1 = time.monotonic()
        earlier = {r["run-id"] for r in fed.runs()}
        proc = fed.run(f"num-server-rounds=2 {SMALL} dp-mode='sample' dp-recipe='none' "
                       f"target-epsilon=4.0 output-dir='{out}' run-name='sites'", timeout=900)
        wall = time.monotonic() - t0
        runs = fed.runs()
        nodes = json.loads(fed.flwr("supernode", "list", "local-deployment", "--format",
                                    "json").stdout)["nodes"]
    finally:
        fed.stop()
    assert refused.returncode == 0, refused.stdout[-4000:]
    assert proc.returncode == 0, proc.stdout[-4000:]
    _assert_all_stopped(fed)

    # The weaker run: both sites refused it, naming their policy's key; nothing was trained.
    (r1,) = json.loads((out / "weaker" / "metrics.json").read_text())["rounds"][1:]
    assert r1["clients_accepted"] == 0 and r1["clients_refused"] == 2, r1
    assert all("'accept-dp-modes'" in r["reason"] for r in r1["refused"]), r1["refused"]
    assert "accept-dp-modes" in refused.stdout
    assert not (out / "weaker" / "privacy.csv").exists()

    # TLS and authentication were on: the connection trusts our CA, the SuperLink served
    # with our certificate and required registered keys, and only the registered nodes ran.
    config_toml = (fed.flwr_home / "config.toml").read_text()
    assert "root-certificates" in config_toml and "insecure" not in config_toml
    link_cmd = next(p.args for n, p in fed.procs if n == "superlink")
    assert "--enable-supernode-auth" in link_cmd and "--ssl-certfile" in link_cmd
    assert {int(n["node-id"]) for n in nodes} == set(fed.node_ids.values())

    run_dir = out / "sites"
    for name in ("metrics.json", "comms.csv", "comms.json", "privacy.csv", "checkpoint.npz",
                 "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    rows = list(csv.DictReader((run_dir / "privacy.csv").open()))
    assert len(rows) == 4 and all(0 < float(r["epsilon"]) <= 4.0 for r in rows)
    assert {int(r["node"]) for r in rows} == set(fed.node_ids.values())
    # Each site's ledger is on the site, in the file its node-config names.
    for cfg in configs:
        assert os.path.getsize(cfg["privacy-state-path"]) > 0

    comms = json.loads((run_dir / "comms.json").read_text())
    ours = comms["total_bytes"]["up"] + comms["total_bytes"]["down"]
    (run,) = [r for r in runs if r["run-id"] not in earlier]
    flower = run["network-traffic"]["total-bytes"]
    # Flower counts whole messages (configs, metrics and framing too) but stores arrays
    # content-addressed, so identical arrays of a message (the all-zero B factors of the
    # initial adapter) travel once: over two rounds the totals agree within a few percent.
    print(f"two-site TLS run: {wall:.1f} s wall ({t1 - t0:.1f} s to the refused run's end); "
          "per round "
          f"{comms['per_round']}; flower {run['network-traffic']}; node events {fed.events}")
    assert abs(flower - ours) / ours < 0.08, (flower, ours)
    for name, ev in fed.events.items():
        assert ev["connected"] <= ev["first-message"] <= ev["first-reply"], (name, ev)


def test_unregistered_supernode_is_refused(tmp_path):
    configs = default_node_configs(2, tmp_path, None)
    fed = LocalFederation(tmp_path, configs[:1])
    try:
        fed.start()
        intruder = fed.start_node(1, configs[1], register=False)  # a key nobody registered
        deadline = time.monotonic() + 120
        while intruder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        nodes = json.loads(fed.flwr("supernode", "list", "local-deployment", "--format",
                                    "json").stdout)["nodes"]
    finally:
        fed.stop()
    _assert_all_stopped(fed)
    assert intruder.returncode not in (None, 0)
    assert "Failed to activate SuperNode" in fed.log("supernode1")
    assert [int(n["node-id"]) for n in nodes] == [fed.node_ids[0]]  # only the registered one


def test_killed_supernode_is_dropped_and_the_run_finishes(tmp_path):
    configs = default_node_configs(2, tmp_path, None)
    out = tmp_path / "results"
    fed = LocalFederation(tmp_path, configs)
    killed: dict[str, float] = {}

    def kill_when_training(f: LocalFederation) -> None:
        # Kill site 1 while it trains in round 1 (its ClientApp is running).
        if not killed and "first-message" in f.events.get("supernode1", {}):
            f.kill_node(1)
            killed["at"] = time.monotonic()

    try:
        fed.start()
        proc = fed.run(f"num-server-rounds=2 {SMALL} output-dir='{out}' run-name='killed'",
                       timeout=900, on_poll=kill_when_training)
    finally:
        fed.stop()
    _assert_all_stopped(fed)
    assert killed, "site 1 never received its round-1 message"
    assert proc.returncode == 0, proc.stdout[-4000:]
    dead, alive = fed.node_ids[1], fed.node_ids[0]
    # The server's log names the node that dropped out, and why.
    assert re.search(rf"round 1: node {dead} dropped out of the round: .*Node Unavailable",
                     proc.stdout), proc.stdout[-4000:]
    rounds = json.loads((out / "killed" / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    r1 = rounds[1]
    assert r1["clients_sampled"] == 2 and r1["clients_accepted"] == 1
    assert r1["clients_dropped"] == 1 and r1["dropped"][0]["node"] == dead
    # Round 2 samples only the node that is still online.
    assert rounds[2]["clients_accepted"] == 1 and rounds[2]["clients_sampled"] == 1
    comms = list(csv.DictReader((out / "killed" / "comms.csv").open()))
    assert {int(r["node"]) for r in comms if r["direction"] == "up"} == {alive}


def test_secure_aggregation_over_tls_survives_a_killed_site(tmp_path):
    """Three sites aggregate securely over TLS with authenticated nodes; one is killed when
    its first round-1 message arrives. Three sites have two neighbours each and a threshold
    of two, so that round cannot rebuild the others' masks: it releases nothing and says
    so; round 2 samples the two left and releases their sum."""
    configs = default_node_configs(3, tmp_path, None)
    out = tmp_path / "results"
    fed = LocalFederation(tmp_path, configs)
    killed: dict[str, float] = {}

    def kill_in_round_one(f: LocalFederation) -> None:
        if not killed and "first-message" in f.events.get("supernode2", {}):
            f.kill_node(2)
            killed["at"] = time.monotonic()

    try:
        fed.start()
        proc = fed.run(f"num-server-rounds=2 {SMALL} secure-aggregation=true "
                       f"output-dir='{out}' run-name='secure'",
                       timeout=900, on_poll=kill_in_round_one)
    finally:
        fed.stop()
    _assert_all_stopped(fed)
    assert killed, "site 2 never received its round-1 message"
    assert proc.returncode == 0, proc.stdout[-4000:]
    rounds = json.loads((out / "secure" / "metrics.json").read_text())["rounds"]
    assert [r["clients_accepted"] for r in rounds[1:]] == [0, 2], rounds[1:]
    assert "released nothing" in rounds[1]["note"], rounds[1]
    assert rounds[1]["test_accuracy"] == rounds[0]["test_accuracy"]  # the adapter as it was
    assert rounds[2]["test_accuracy"] != rounds[0]["test_accuracy"]  # the sums were applied
    comms = list(csv.DictReader((out / "secure" / "comms.csv").open()))
    stages = {f"secagg_{s}" for s in ("setup", "advertise", "share_keys", "masked_input",
                                       "consistency", "unmask")}
    assert stages <= {r["kind"] for r in comms}
    up = {int(r["node"]) for r in comms if r["direction"] == "up" and r["round"] == "2"}
    assert up == {fed.node_ids[0], fed.node_ids[1]}


def test_interrupted_local_federation_stops_every_process(tmp_path):
    import signal
    import subprocess
    import sys

    from simulations.local_federation import ROOT

    work = tmp_path / "fed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.local_federation", "--nodes", "2", "--workdir",
         str(work), "--run-config", "num-server-rounds=3 local-steps=1 test-fraction=0.03"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        log = work / "supernode1.log"
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and "Receiving: train message" in log.read_text(errors="replace"):
                break  # mid-run: both SuperNodes connected and training has started
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout
    assert left.strip() == "", f"processes left behind: {left}"
    assert proc.returncode != 0  # interrupted, and says so
