"""Pinned identities (node-config ``secagg-identity`` and ``secagg-peers``): a server can
neither impersonate a site nor add parties of its own to a secure round."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlora.secagg import RoundAborted, RoundConfig, SecAggClient
from fedlora.secagg.crypto import public_bytes
from fedlora.secagg.identity import generate, load_identity, load_peers
from fedlora.secagg.local import run_local_round
from fedlora.secagg.state import dump_client, flatten, load_client, unflatten
from simulations.harness import node_config_mod

from .test_simulation import run_in_process


@pytest.fixture()
def identities(tmp_path):
    """Four sites' key files and a peers file listing their public keys."""
    keys = [tmp_path / f"site-{i}.key" for i in range(4)]
    public = [generate(k) for k in keys]
    peers = tmp_path / "peers.txt"
    peers.write_text("# the federation's sites\n" + "\n".join(public) + "\n")
    return keys, peers


def test_key_files_round_trip_and_bad_ones_name_the_key(identities, tmp_path):
    keys, peers = identities
    assert oct(keys[0].stat().st_mode & 0o777) == "0o600"
    assert public_bytes(load_identity(keys[0])).hex() in peers.read_text()
    assert len(load_peers(peers)) == 4
    with pytest.raises(FileExistsError):
        generate(keys[0])  # an identity is never overwritten
    (tmp_path / "bad.key").write_text("abcd\n")
    with pytest.raises(ValueError, match="secagg-identity"):
        load_identity(tmp_path / "bad.key")
    with pytest.raises(ValueError, match="secagg-peers"):
        load_peers(tmp_path / "bad.key")


def test_pinned_clients_sum_and_refuse_a_stranger_or_a_counted_twice_identity(identities):
    keys, peers = identities
    trusted = load_peers(peers)
    cohort = [11, 12, 13, 14]
    config = RoundConfig.create(1, cohort, length=5, bits=16)
    inputs = {u: np.arange(5) + u for u in cohort}

    def clients(signers):
        return {u: SecAggClient(u, identity=load_identity(keys[s]), trusted=trusted)
                for u, s in zip(cohort, signers)}

    total = run_local_round(config, inputs, clients=clients([0, 1, 2, 3]))
    assert np.array_equal(total.total, sum(inputs.values()) % 2**16)
    # A party the server made up (a fresh key, not in anyone's peers file): refused.
    stranger = clients([0, 1, 2, 3])
    stranger[14] = SecAggClient(14, trusted=trusted)
    refusals: dict = {}
    with pytest.raises(RoundAborted):
        run_local_round(RoundConfig.create(2, cohort, length=5, bits=16), inputs,
                        clients=stranger, refusals=refusals)
    assert any("does not trust" in str(e) for e in refusals.values()), refusals
    # One pinned site counted twice (two node ids signing with its identity): refused.
    refusals = {}
    with pytest.raises(RoundAborted):
        run_local_round(RoundConfig.create(3, cohort, length=5, bits=16), inputs,
                        clients=clients([0, 1, 2, 2]), refusals=refusals)
    assert any("one identity" in str(e) for e in refusals.values()), refusals


def test_a_pinned_clients_state_never_holds_its_private_key(identities):
    keys, peers = identities
    identity = load_identity(keys[0])
    client = SecAggClient(11, identity=identity, trusted=load_peers(peers))
    client.setup(RoundConfig.create(1, [11, 12, 13], length=3, bits=8).to_message())
    state = unflatten(flatten(dump_client(client)))
    secret = identity.private_bytes_raw()
    assert secret not in [v for v in flatten(state).values() if isinstance(v, bytes)]
    with pytest.raises(ValueError, match="identity"):
        load_client(state)  # the node must give its identity again
    again = load_client(state, identity=identity, trusted=load_peers(peers))
    assert again.stage == "advertise" and again.trusted == load_peers(peers)


@pytest.mark.slow
def test_a_run_of_pinned_sites_completes_and_one_unpinned_site_stops_the_round(
        identities, custom_task, tmp_path):
    keys, peers = identities
    overrides = {**custom_task, "lora-rank": 2, "lora-alpha": 4.0, "num-server-rounds": 1,
                 "local-steps": 1, "fraction-train": 1.0, "fraction-evaluate": 0.0,
                 "secure-aggregation": True, "secagg-clip": 0.05, "run-name": "pinned"}

    def pinned(pid):
        return {"secagg-identity": str(keys[pid]), "secagg-peers": str(peers)}

    run_dir = run_in_process(overrides, num_nodes=4, mods=[node_config_mod(pinned)])
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert rounds[1]["clients_accepted"] == 4
    # Site 3 has no identity (the server's own party, say): its neighbours refuse the round.
    run_dir = run_in_process({**overrides, "run-name": "stranger"}, num_nodes=4, mods=[
        node_config_mod(lambda pid: pinned(pid) if pid < 3 else {})])
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert rounds[1]["clients_accepted"] == 0 and "does not trust" in rounds[1]["note"]
