"""Secure aggregation in fedlora's rounds (``secure-aggregation = true``): the server sees
masked vectors only and releases exactly the mean of the survivors' quantised updates."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from fedlora.config import ConfigError
from fedlora.runtime import parse_run_config
from fedlora.secagg import (
    ProtocolError,
    RoundConfig,
    SecAggClient,
    SecAggServer,
    decode,
)
from fedlora.secagg.state import dump_client, flatten, load_client, unflatten
from fedlora.secure_sum import SecureSum, resolve_graph

from .test_resume import fedlora_log
from .test_simulation import run_in_process


# -- pieces, in-process ---------------------------------------------------------------------
def test_a_round_survives_every_stage_in_another_process_and_a_dropout():
    """Each stage rebuilds the client from its flat state and reads flat messages (as a
    ClientApp does); node ids beyond int64; a node that drops after sharing its keys."""
    cohort = [5, 2**63 + 7, 9, 11]
    config = RoundConfig.create(3, cohort, length=7, bits=12)
    inputs = {u: np.random.default_rng(u % 97).integers(0, 400, 7) for u in cohort}
    states: dict[int, dict] = {}

    def deliver(stage, messages, gone=()):
        replies = {}
        for u, message in messages.items():
            if u in gone:
                continue
            client = SecAggClient(u) if stage == "setup" else load_client(
                unflatten(flatten(states[u])))
            message = unflatten(flatten(message))
            reply = (client.masked_input(message, inputs[u]) if stage == "masked_input"
                     else getattr(client, stage)(message))
            states[u] = dump_client(client)
            replies[u] = reply if stage == "masked_input" else unflatten(flatten(reply))
        return replies

    server = SecAggServer(config)
    messages = server.collect_commitments(deliver("setup", server.setup()))
    messages = server.collect_keys(deliver("advertise", messages))
    messages = server.collect_shares(deliver("share_keys", messages))
    messages = server.collect_masked(deliver("masked_input", messages, gone=(9,)))
    messages = server.collect_signatures(deliver("consistency", messages))
    total = server.aggregate(deliver("unmask", messages))
    assert total.survivors == (5, 11, 2**63 + 7)
    assert np.array_equal(total.total, sum(inputs[u] for u in total.survivors) % 2**12)


def test_quantisation_is_unbiased_bounded_and_its_mean_adds_to_the_received_adapter():
    q = SecureSum(clip=0.5, levels=100)
    received = {"b": np.zeros((2, 3), np.float32), "a": np.ones(4, np.float32)}
    reply = {"a": np.ones(4) + np.array([0.123, -0.2, 9.0, -9.0]), "b": np.full((2, 3), 0.0037)}
    bits = q.bits(3)
    draws = np.stack([decode(q.quantise(reply, received, bits), bits) for _ in range(2000)])
    assert draws.min() >= -100 and draws.max() <= 100  # clipped to the public bound
    expected = np.array([24.6, -40.0, 100, -100] + [0.74] * 6)  # "a" first (sorted keys)
    assert np.allclose(draws.mean(axis=0), expected, atol=0.05)
    mean = q.mean(draws[:3].sum(axis=0), 3, received)
    assert np.allclose(mean["a"], 1 + draws[:3, :4].mean(axis=0) * q.step)
    with pytest.raises(ValueError, match="global rank"):
        q.quantise({"a": reply["a"]}, received, bits)


@pytest.mark.parametrize("changes, key", [
    ({"aggregator": "svd"}, "aggregator"),
    ({"aggregator": "stack"}, "aggregator"),
    ({"secagg-threshold": 0.5}, "secagg-threshold"),
    ({"secagg-threshold": 3.5}, "secagg-threshold"),
])
def test_runs_that_cannot_aggregate_securely_are_refused_naming_the_key(changes, key):
    with pytest.raises(ConfigError) as info:
        parse_run_config({"secure-aggregation": True, **changes})
    assert info.value.key == key
    if key != "secagg-threshold":
        parse_run_config(changes)  # accepted without secure aggregation


def test_threshold_and_degree_are_checked_against_the_cohort():
    def cfg(**keys):
        return parse_run_config({"secure-aggregation": True, **keys})

    assert resolve_graph(cfg(), 5) == (4, 3)  # every other site, 2/3 of them
    assert resolve_graph(cfg(**{"secagg-threshold": 4}), 5) == (4, 4)
    for keys, key in (({"secagg-threshold": 5}, "secagg-threshold"),  # > the 4 neighbours
                      ({"secagg-threshold": 2}, "secagg-threshold"),  # not over half
                      ({"secagg-degree": 3}, "secagg-degree")):  # odd, under n - 1 = 9
        with pytest.raises(ConfigError) as info:
            resolve_graph(cfg(**keys), 10 if key == "secagg-degree" else 5)
        assert info.value.key == key


def test_sites_answer_each_stage_from_their_node_state_and_refuse_a_foreign_config(identity):
    """The ClientApp's stage handlers, each with a fresh Context that shares only the node
    state (as Flower gives them), through a whole round; then a config the run-config does
    not imply, and a stage without setup."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedlora.app.client.secure_aggregation import masked_reply, ready_to_train, stage_fn
    from fedlora.protocol import CONFIG_KEY, LORA_KEY, STATUS_KEY
    from fedlora.secagg import COMPLETE
    from fedlora.secure_sum import from_records, message_type, to_records
    from fedlora.wire import to_record

    run_config = {"secure-aggregation": True, "secagg-clip": 1.0, "secagg-levels": 10}
    cfg, cohort = parse_run_config(run_config), [7, 8, 9]
    q = SecureSum.from_config(cfg)
    states = {u: RecordDict() for u in cohort}
    received = {"w": np.zeros(3, np.float32)}
    updates = {7: [0.1, 0.2, -0.3], 8: [0.5, -0.1, 0.0], 9: [-2.0, 0.3, 0.3]}  # 9: clipped

    def send(stage, u, body, node_config=None):
        ctx = Context(run_id=1, node_id=u, node_config=node_config or {}, state=states[u],
                      run_config=run_config)
        records = {**to_records(body), CONFIG_KEY: ConfigRecord({"server-round": 1})}
        if stage == "masked_input":
            records[LORA_KEY] = to_record(received)
        msg = Message(RecordDict(records), dst_node_id=u, message_type=message_type(stage))
        if stage == "masked_input":
            ready_to_train(msg, ctx)
            return masked_reply(msg, ctx, cfg, {"w": received["w"] + np.array(updates[u])})
        return stage_fn(stage, msg, ctx)

    def deliver(stage, messages):
        replies = {u: send(stage, u, body) for u, body in messages.items()}
        assert all(r.content[STATUS_KEY]["status"] == "ok" for r in replies.values())
        return {u: from_records(r.content) for u, r in replies.items()}

    _, threshold = resolve_graph(cfg, 3)
    server = SecAggServer(RoundConfig.create(1, cohort, length=3, bits=q.bits(3),
                                             degree=COMPLETE, threshold=threshold))
    messages = server.collect_commitments(deliver("setup", server.setup()))
    messages = server.collect_keys(deliver("advertise", messages))
    messages = server.collect_shares(deliver("share_keys", messages))
    messages = server.collect_masked(deliver("masked_input", messages))
    messages = server.collect_signatures(deliver("consistency", messages))
    total = server.aggregate(deliver("unmask", messages))
    mean = q.mean(total.signed(), 3, received)["w"]
    assert np.allclose(mean, np.mean([updates[7], updates[8], [-1.0, 0.3, 0.3]], axis=0),
                       atol=q.step)

    for u in cohort:  # a finished round leaves no secret in the node state
        assert dict(states[u]["fedlora-secagg"]) == {"done-round": 1}

    foreign = RoundConfig.create(1, cohort, length=3, bits=40, degree=COMPLETE,
                                 threshold=threshold)
    reply = send("setup", 7, foreign.to_message())
    assert reply.content[STATUS_KEY]["status"] == "could-not-train"
    assert "run-config" in reply.content[STATUS_KEY]["reason"], dict(reply.content[STATUS_KEY])
    with pytest.raises(ProtocolError, match="not ready"):  # done: no training for it
        send("masked_input", 7, {})
    reply = send("setup", 7, server.config.to_message(), node_config={"lora-rank": 4})
    assert "global rank" in reply.content[STATUS_KEY]["reason"]  # refused before training
    states[8] = RecordDict()
    reply = send("share_keys", 8, {"keys": {}})
    assert "no setup seen" in reply.content[STATUS_KEY]["reason"]


# -- whole runs, in-process simulations ----------------------------------------------------
def _capture_mod(folder: str):
    """A client mod (it runs in the simulation's workers): records every reply's records
    and, in the masked-input stage, the site's integer vector before masking and the masked
    vector it sends."""

    def mod(msg, context, call_next):
        from fedlora import secure_sum

        kind = msg.metadata.message_type
        config = msg.content.config_records.get("config")
        rnd = int(config.get("server-round", 0)) if config is not None else 0
        tag = f"{rnd}-{context.node_id}"
        original = secure_sum.SecureSum.quantise

        def quantise(self, reply, received, bits):
            vector = original(self, reply, received, bits)
            np.save(Path(folder) / f"plain-{tag}.npy", decode(vector, bits))
            return vector

        secure_sum.SecureSum.quantise = quantise
        try:
            reply = call_next(msg, context)
        finally:
            secure_sum.SecureSum.quantise = original
        if "secagg-masked" in reply.content:
            masked = secure_sum.from_records(reply.content)["masked"]
            np.save(Path(folder) / f"masked-{tag}.npy", masked)
        with open(Path(folder) / "replies.jsonl", "a") as f:
            f.write(json.dumps({"type": kind, "round": rnd, "node": context.node_id,
                                "records": sorted(reply.content.keys()),
                                "sent": sorted(msg.content.keys())}) + "\n")
        return reply

    return mod


@pytest.fixture()
def server_sums(monkeypatch):
    """What the server reveals in each round: (round, survivors, signed sum, bits), and the
    adapter it received and released."""
    seen: dict[str, list] = {"sums": [], "means": []}
    aggregate, mean = SecAggServer.aggregate, SecureSum.mean

    def spy_aggregate(self, replies):
        total = aggregate(self, replies)
        seen["sums"].append((self.config.round_id, total.survivors, total.signed(), total.bits))
        return total

    def spy_mean(self, total, survivors, received):
        out = mean(self, total, survivors, received)
        seen["means"].append((received, out))
        return out

    monkeypatch.setattr(SecAggServer, "aggregate", spy_aggregate)
    monkeypatch.setattr(SecureSum, "mean", spy_mean)
    return seen


@pytest.fixture()
def sends(monkeypatch):
    """Every send of the server's grid: (message types, timeout)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    seen: list[tuple[list[str], float | None]] = []
    original = InMemoryGrid.send_and_receive

    def spy(self, messages, *, timeout=None):
        messages = list(messages)
        seen.append(([m.metadata.message_type for m in messages], timeout))
        return original(self, messages, timeout=timeout)

    monkeypatch.setattr(InMemoryGrid, "send_and_receive", spy)
    return seen


def _run(custom_task, tmp_path, num_nodes: int, **extra) -> tuple[Path, Path]:
    folder = tmp_path / "captured"
    folder.mkdir()
    overrides = {**custom_task, "lora-rank": 2, "lora-alpha": 4.0, "num-server-rounds": 2,
                 "local-steps": 1, "fraction-train": 1.0, "fraction-evaluate": 0.0,
                 "secure-aggregation": True, "aggregator": "fedavg", "secagg-clip": 0.05,
                 "run-name": "secure", **extra}
    run_dir = run_in_process(overrides, num_nodes=num_nodes, mods=[_capture_mod(str(folder))])
    return run_dir, folder


def _plain(folder: Path, rnd: int, node: int) -> np.ndarray:
    return np.load(folder / f"plain-{rnd}-{node}.npy")


@pytest.mark.slow
def test_the_server_sees_only_masked_vectors_and_releases_their_exact_mean(
        custom_task, tmp_path, server_sums, sends):
    run_dir, folder = _run(custom_task, tmp_path, num_nodes=4,
                           **{"round-timeout": 120.0, "fraction-evaluate": 1.0})
    assert not [types for types, _ in sends if any(t.startswith("evaluate") for t in types)]
    stages = [(set(types), timeout) for types, timeout in sends
              if types and types[0].startswith("train")]
    assert [types for types, _ in stages] == 2 * [{f"train.secagg_{s}"} for s in (
        "setup", "advertise", "share_keys", "masked_input", "consistency", "unmask")]
    for r in range(2):  # one deadline for the round's six stages together
        waits = [timeout for _, timeout in stages[6 * r: 6 * r + 6]]
        assert 110.0 < waits[0] <= 120.0 and waits == sorted(waits, reverse=True), waits
    replies = [json.loads(line) for line in (folder / "replies.jsonl").read_text().splitlines()]
    assert {r["type"] for r in replies if r["type"].startswith("train")} == {
        "train.secagg_setup", "train.secagg_advertise", "train.secagg_share_keys",
        "train.secagg_masked_input",
        "train.secagg_consistency", "train.secagg_unmask"}
    for r in replies:  # no adapter, no metrics: protocol records and a status
        if r["type"].startswith("train"):
            assert "lora" not in r["records"] and "metrics" not in r["records"], r
            # the global adapter goes out with the stage where sites train, only
            assert ("lora" in r["sent"]) == (r["type"] == "train.secagg_masked_input"), r
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["clients_accepted"] for r in rounds[1:]] == [4, 4]

    assert len(server_sums["sums"]) == 2
    for rnd, survivors, total, bits in server_sums["sums"]:
        assert len(survivors) == 4
        # Exact: the revealed sum is the sum of the sites' integer vectors before masking.
        assert np.array_equal(total, sum(_plain(folder, rnd, u) for u in survivors))
    for received, released in server_sums["means"]:
        assert any(not np.array_equal(received[k], released[k]) for k in received)

    # Two sites' masked vectors look uniform mod 2^k; their plain vectors do not.
    rnd, survivors, _, bits = server_sums["sums"][0]
    for u in survivors[:2]:
        masked = np.load(folder / f"masked-{rnd}-{u}.npy").astype(np.float64) / 2**bits
        quarters = np.histogram(masked, bins=4, range=(0, 1))[0] / masked.size
        assert masked.size > 200 and np.all(np.abs(quarters - 0.25) < 0.09), quarters  # ~5 sd
        plain = (_plain(folder, rnd, u) % 2**bits) / 2**bits
        assert np.max(np.abs(np.histogram(plain, bins=4, range=(0, 1))[0] / plain.size - 0.25)) > 0.2

    import csv

    rows = list(csv.DictReader((run_dir / "comms.csv").open()))
    up = {r["kind"] for r in rows if r["direction"] == "up" and int(r["bytes"]) > 0}
    assert up == {"secagg_setup", "secagg_advertise", "secagg_share_keys",
                  "secagg_masked_input", "secagg_consistency", "secagg_unmask"}, up  # the protocol's bytes counted
    assert rounds[1]["bytes_up"] == sum(int(r["bytes"]) for r in rows
                                        if r["direction"] == "up" and r["round"] == "1")
    # Every stage's bytes, both ways, are what its formula predicts (fedlora.secagg_bytes).
    assert all(r["bytes"] == r["analytic_bytes"] for r in rows), [
        r for r in rows if r["bytes"] != r["analytic_bytes"]]
    assert json.loads((run_dir / "comms.json").read_text())["measured_equals_analytic"]

@pytest.mark.slow
def test_a_site_that_drops_after_sharing_is_removed_and_too_few_release_nothing(
        custom_task, tmp_path, server_sums):
    # seed 2, dropout 0.3: partition 1 fails in round 1, partitions 2 and 3 in round 2 (at
    # the masked-input stage, after sharing keys); threshold 3 of 4 neighbours needs 4.
    with fedlora_log() as records:
        run_dir, folder = _run(custom_task, tmp_path, num_nodes=5, **{
            "seed": 2, "dropout-fraction": 0.3, "secagg-threshold": 3, "num-partitions": 5})
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert rounds[1]["clients_accepted"] == 4 and rounds[1]["clients_dropped"] == 1
    assert len(server_sums["sums"]) == 1  # round 2 revealed nothing
    rnd, survivors, total, _ = server_sums["sums"][0]
    assert rnd == 1 and len(survivors) == 4
    assert np.array_equal(total, sum(_plain(folder, rnd, u) for u in survivors))
    assert rounds[2]["clients_accepted"] == 0 and rounds[2]["clients_dropped"] == 2
    assert "released nothing" in rounds[2]["note"], rounds[2]
    lines = [x.getMessage() for x in records if x.levelno == logging.WARNING
             and "round 2: secure aggregation released nothing" in x.getMessage()]
    assert len(lines) == 1 and "left unchanged" in lines[0], lines
    assert not [x for x in records if "could not write" in x.getMessage()]  # the report
    assert "released nothing" in (run_dir / "report.html").read_text()
    # Dropouts, refusals and an aborted round included: every stage's bytes are its formula.
    assert json.loads((run_dir / "comms.json").read_text())["measured_equals_analytic"]
