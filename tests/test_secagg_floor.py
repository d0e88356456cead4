"""A site's floor on the cohort and the threshold of a secure round (node-config
``secagg-min-cohort``, ``secagg-min-threshold``): checked by the site against what the
round announces, whatever the run-config says; a round under it sees no masked input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora.app.client.secure_aggregation import STATE_KEY, register, stage_fn
from fedlora.privacy.site_policy import POLICY_KEYS, PolicyRefusal, SitePolicy
from fedlora.protocol import CONFIG_KEY, LORA_KEY, STATUS_KEY
from fedlora.runtime import parse_run_config
from fedlora.secagg import (
    COMPLETE,
    ProtocolError,
    RoundAborted,
    RoundConfig,
    SecAggClient,
    SecAggServer,
    run_local_round,
)
from fedlora.secagg.floor import Floor
from fedlora.secagg.state import dump_client, flatten, load_client, unflatten
from fedlora.secure_sum import SecureSum, from_records, message_type, resolve_graph, to_records
from fedlora.wire import to_record
from simulations.harness import node_config_mod

from .test_simulation import run_in_process


@pytest.mark.parametrize("key, value", [
    ("secagg-min-cohort", 1), ("secagg-min-cohort", "many"), ("secagg-min-cohort", 2.5),
    ("secagg-min-cohort", True), ("secagg-min-threshold", 0), ("secagg-min-threshold", -3),
])
def test_bad_floors_are_refused_naming_the_key_and_value(key, value):
    with pytest.raises(PolicyRefusal) as info:
        SitePolicy.from_node_config({key: value})
    assert f"'{key}'" in str(info.value) and repr(value) in str(info.value)


def test_floors_parse_from_node_config():
    assert {"secagg-min-cohort", "secagg-min-threshold"} <= set(POLICY_KEYS)
    policy = SitePolicy.from_node_config({"secagg-min-cohort": "8", "secagg-min-threshold": 5})
    assert (policy.secagg_min_cohort, policy.secagg_min_threshold) == (8, 5)
    assert SitePolicy.from_node_config({}).secagg_min_cohort is None
    with pytest.raises(ValueError, match="min_cohort"):
        Floor(min_cohort=1)


class Counting(SecAggClient):
    """A client that counts the masked inputs it sends (what a floor must stop)."""

    sent = 0

    def masked_input(self, message, vector):
        out = super().masked_input(message, vector)
        self.sent += 1
        return out


def _inputs(cohort, length=4):
    return {u: np.arange(length) + u for u in cohort}


def test_a_config_under_the_floor_is_refused_at_setup():
    config = RoundConfig.create(1, [1, 2, 3, 4], length=4, bits=16, degree=COMPLETE,
                                threshold=2)
    with pytest.raises(ProtocolError, match="cohort holds 4 sites, below .* min_cohort = 5"):
        SecAggClient(1, floor=Floor(min_cohort=5)).setup(config.to_message())
    with pytest.raises(ProtocolError, match="threshold of 2 shares is below .*min_threshold"):
        SecAggClient(1, floor=Floor(min_threshold=3)).setup(config.to_message())
    SecAggClient(1, floor=Floor(min_cohort=4, min_threshold=2)).setup(config.to_message())


def test_too_few_sites_drawing_the_graph_are_refused_before_any_key_is_made():
    """The config names 6 sites; the server shows the floored site only 4 commitments to
    the graph seed (the sites it keeps in the round): it reveals nothing and makes no key."""
    cohort = [1, 2, 3, 4, 5, 6]
    config = RoundConfig.create(1, cohort, length=4, bits=16, degree=COMPLETE, threshold=3)
    clients = {u: SecAggClient(u, floor=Floor(min_cohort=5)) for u in cohort}
    commitments = {u: clients[u].setup(config.to_message())["commitment"] for u in cohort}
    few = {u: commitments[u] for u in (1, 2, 3, 4)}
    with pytest.raises(ProtocolError, match="drew the graph holds 4 sites, below"):
        clients[1].advertise({"commitments": few})
    assert clients[1].stage == "aborted" and not hasattr(clients[1], "_c_sk")
    assert "seed_share" in clients[2].advertise({"commitments": commitments})


def test_a_server_that_shrinks_the_round_after_setup_gets_no_masked_input():
    """The config names 6 sites; the server drops 2 before the masked input: the floored
    site never masks (and an unfloored one would have)."""
    cohort = [1, 2, 3, 4, 5, 6]
    config = RoundConfig.create(1, cohort, length=4, bits=16, degree=COMPLETE, threshold=3)
    clients = {u: Counting(u, floor=Floor(min_cohort=5) if u == 1 else None) for u in cohort}
    refusals: dict = {}
    with pytest.raises(RoundAborted):  # 2, 3 and 4 alone are under the threshold's t + 1
        run_local_round(config, _inputs(cohort), clients=clients, refusals=refusals,
                        dropouts={"share_keys": [5, 6]})
    assert clients[1].sent == 0 and clients[2].sent == 1
    assert "U2" in str(refusals[1]) and "min_cohort = 5" in str(refusals[1])
    assert clients[1].stage == "aborted"


def test_a_sum_under_the_floor_gets_no_signature_and_no_share():
    cohort = [1, 2, 3, 4, 5, 6]
    config = RoundConfig.create(1, cohort, length=4, bits=16, degree=COMPLETE, threshold=3)
    clients = {u: SecAggClient(u, floor=Floor(min_cohort=5)) for u in cohort}
    refusals: dict = {}
    with pytest.raises(RoundAborted):
        run_local_round(config, _inputs(cohort), clients=clients, refusals=refusals,
                        dropouts={"masked_input": [5, 6]})
    assert set(refusals) == {1, 2, 3, 4}
    assert all("U3" in str(e) and "min_cohort = 5" in str(e) for e in refusals.values())
    # Without the floor the same server gets its sum of 4 sites.
    total = run_local_round(config, _inputs(cohort), dropouts={"masked_input": [5, 6]})
    assert total.survivors == (1, 2, 3, 4)


def test_the_floor_comes_from_the_site_and_never_from_its_stored_state():
    config = RoundConfig.create(1, [1, 2, 3], length=2, bits=8, degree=COMPLETE, threshold=2)
    client = SecAggClient(1, floor=Floor(min_cohort=3))
    client.setup(config.to_message())
    state = unflatten(flatten(dump_client(client)))
    assert not any("floor" in k for k in flatten(state))
    assert load_client(state, floor=Floor(min_cohort=3)).floor.min_cohort == 3


# -- the ClientApp: node-config against the announced round, whatever the run-config says ---
RUN_CONFIG = {"secure-aggregation": True, "secagg-clip": 1.0, "secagg-levels": 10,
              "secagg-threshold": 2}


def message(stage, u, body, server_round=1):
    records = {**to_records(body), CONFIG_KEY: ConfigRecord({"server-round": server_round})}
    if stage == "masked_input":
        records[LORA_KEY] = to_record({"w": np.zeros(3, np.float32)})
    return Message(RecordDict(records), dst_node_id=u, message_type=message_type(stage))


def round_config(cohort):
    cfg = parse_run_config(RUN_CONFIG)
    degree, threshold = resolve_graph(cfg, len(cohort))
    return RoundConfig.create(1, cohort, length=3, bits=SecureSum.from_config(cfg).bits(
        len(cohort)), degree=COMPLETE if degree == len(cohort) - 1 else degree,
        threshold=threshold)


@pytest.mark.parametrize("node_config, key", [
    ({"secagg-min-cohort": 4}, "secagg-min-cohort"),
    ({"secagg-min-threshold": 3}, "secagg-min-threshold"),
    ({"secagg-min-cohort": "four"}, "secagg-min-cohort"),
])
def test_a_site_refuses_a_round_the_run_config_allows_but_its_floor_does_not(
        identity, node_config, key):
    """The run-config (threshold 2 of 3 sites) is followed to the letter; the site's floor
    refuses it all the same, naming its key."""
    state = RecordDict()  # (a simulated site: a deployed one would also need pinning)
    ctx = Context(run_id=1, node_id=7, node_config={**node_config, "partition-id": 0},
                  state=state,
                  run_config=RUN_CONFIG)
    reply = stage_fn("setup", message("setup", 7, round_config([7, 8, 9]).to_message()), ctx)
    status = reply.content[STATUS_KEY]
    assert status["status"] == "could-not-train" and key in status["reason"], dict(status)
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(),
                  run_config=RUN_CONFIG)
    ok = stage_fn("setup", message("setup", 7, round_config([7, 8, 9]).to_message()), ctx)
    assert ok.content[STATUS_KEY]["status"] == "ok"  # the same round without a floor


class App:
    """Stands in for a ClientApp: keeps the handlers :func:`register` gives it."""

    def __init__(self):
        self.handlers = {}

    def train(self, action):
        def keep(fn):
            self.handlers[action] = fn
            return fn
        return keep


class Sites:
    """Sites' node states and the ClientApp's handlers, driven by an honest server."""

    def __init__(self, cohort, train, node_config=None, state=RecordDict):
        self.states = {u: state() for u in cohort}
        self.node_config = node_config or {}
        self.app = App()
        register(self.app, None, train)
        self.config = round_config(cohort)
        self.server = SecAggServer(self.config)

    def context(self, u, state=None):
        return Context(run_id=1, node_id=u, node_config=self.node_config,
                       state=self.states[u] if state is None else state,
                       run_config=RUN_CONFIG)

    def send(self, stage, u, body, state=None):
        """``stage`` to site ``u``, on its node state (or on ``state``, a copy of it)."""
        return self.app.handlers[f"secagg_{stage}"](message(stage, u, body),
                                                    self.context(u, state))

    def messages_for(self, stage):
        """The honest server's messages of ``stage``, every earlier stage answered."""
        messages = self.server.setup()
        for earlier, collect in (("setup", self.server.collect_commitments),
                                 ("advertise", self.server.collect_keys),
                                 ("share_keys", self.server.collect_shares)):
            if earlier == stage:
                return messages
            replies = {u: self.send(earlier, u, body) for u, body in messages.items()}
            assert all(r.content[STATUS_KEY]["status"] == "ok" for r in replies.values())
            messages = collect({u: from_records(r.content) for u, r in replies.items()})
        return messages


def test_a_u2_under_the_floor_is_refused_before_the_site_trains(identity):
    """Setup and key sharing pass (a cohort of 4 meets the floor of 4); the server then
    names a U2 of 3: the site refuses without training, and refuses the rest of the round."""
    cohort = [7, 8, 9, 10]
    trained = []
    sites = Sites(cohort, lambda msg, context, respond: trained.append(msg) or msg,
                  node_config={"secagg-min-cohort": 4, "partition-id": 0})
    messages = sites.messages_for("masked_input")
    reply = sites.send("masked_input", 7, {**messages[7], "u2": [7, 8, 9]})
    status = reply.content[STATUS_KEY]
    assert status["status"] == "could-not-train" and "secagg-min-cohort" in status["reason"]
    assert trained == []
    assert dict(sites.states[7][STATE_KEY])["_stage"] == "aborted"
    sites.send("masked_input", 8, messages[8])
    assert len(trained) == 1  # a U2 that meets the floor goes on to train


@pytest.mark.slow
def test_in_a_run_a_site_under_its_floor_stays_out_and_says_why(custom_task):
    """A whole run of 4 sites: the run-config's cohort of 4 is below site 0's floor of 5;
    site 0 sends nothing but its refusal, naming the key, and the other 3 are summed."""
    overrides = {**custom_task, "lora-rank": 2, "lora-alpha": 4.0, "num-server-rounds": 1,
                 "local-steps": 1, "fraction-train": 1.0, "fraction-evaluate": 0.0,
                 "secure-aggregation": True, "secagg-clip": 0.05, "run-name": "floor"}
    run_dir = run_in_process(overrides, num_nodes=4, mods=[
        node_config_mod(lambda pid: {"secagg-min-cohort": 5} if pid == 0 else {})])
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert rounds[1]["clients_accepted"] == 3, rounds[1]
    reasons = [r["reason"] for r in rounds[1]["refused"]]
    assert len(reasons) == 1 and "'secagg-min-cohort' = 5" in reasons[0], reasons
