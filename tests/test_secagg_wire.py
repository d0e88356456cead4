"""Secure aggregation on fedlora's integer wire (``wire-dtype = "int8"``/``"int4"``): the
wire's integer range and its public scale, the masked vector in the smallest unsigned dtype
that holds the modulus, and a revealed sum equal to the plain integer sum."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from flwr.app import RecordDict

from fedlora.config import ConfigError
from fedlora.report import write_report
from fedlora.runtime import parse_run_config
from fedlora.secagg import COMPLETE, RoundConfig, SecAggClient, SecAggServer, decode
from fedlora.secure_sum import (
    MASKED_KEY,
    SecureSum,
    from_records,
    protocol_bytes,
    to_records,
    transport_dtype,
)

from .test_secure_aggregation import _plain, _run, server_sums  # noqa: F401 (a fixture)
from .test_simulation import run_in_process


def _cfg(**keys):
    return parse_run_config({"secure-aggregation": True, **keys})


@pytest.mark.parametrize("wire, levels", [("int8", 127), ("int4", 7), ("float32", 1_048_575),
                                          ("bfloat16", 1_048_575)])
def test_the_integer_wire_sets_the_levels_and_the_clip_is_its_public_scale(wire, levels):
    q = SecureSum.from_config(_cfg(**{"wire-dtype": wire, "secagg-clip": 0.5}))
    assert (q.clip, q.levels) == (0.5, levels)
    assert q.step == 0.5 / levels


def test_levels_that_contradict_the_integer_wire_are_refused_naming_the_key():
    with pytest.raises(ConfigError) as info:
        _cfg(**{"wire-dtype": "int8", "secagg-levels": 1000})
    assert info.value.key == "secagg-levels" and "int8" in str(info.value)
    assert SecureSum.from_config(_cfg(**{"wire-dtype": "int4", "secagg-levels": 7})).levels == 7
    # Without secure aggregation, or on a float wire, secagg-levels is free.
    parse_run_config({"wire-dtype": "int8", "secagg-levels": 1000})
    assert SecureSum.from_config(_cfg(**{"secagg-levels": 1000})).levels == 1000


@pytest.mark.parametrize("bits, dtype", [(1, "uint8"), (7, "uint8"), (8, "uint8"),
                                         (9, "uint16"), (16, "uint16"), (17, "uint32"),
                                         (32, "uint32"), (33, "uint64"), (62, "uint64")])
def test_a_masked_vector_travels_in_the_smallest_dtype_of_the_modulus(bits, dtype):
    assert transport_dtype(bits) == np.dtype(dtype)
    vector = np.array([0, 1, 2**bits - 1, 2**(bits - 1)], dtype=np.uint64)
    records = to_records({"masked": vector}, bits)
    assert records[MASKED_KEY]["masked"].dtype == dtype
    assert protocol_bytes(RecordDict(records)) == 4 * np.dtype(dtype).itemsize
    back = from_records(RecordDict(records))["masked"]
    assert back.dtype == np.uint64 and np.array_equal(back, vector)
    with pytest.raises(ValueError, match="bits"):
        to_records({"masked": vector})
    if bits < 62:
        with pytest.raises(ValueError, match=f"2\\^{bits}"):
            to_records({"masked": vector + np.uint64(2**bits - 1)}, bits)


def _round_through_records(config, vectors, gone_at_masked=()):
    """One round, every message through the records a round sends (the masked vector in
    the round's transport dtype); the server's aggregate and the upload dtypes seen."""
    clients = {u: SecAggClient(u) for u in config.cohort}
    server = SecAggServer(config)
    seen = set()

    def carry(body):
        records = RecordDict(to_records(body, config.bits))
        if MASKED_KEY in records:
            seen.add(records[MASKED_KEY]["masked"].dtype)
            assert protocol_bytes(records) == config.length * transport_dtype(config.bits).itemsize
        return from_records(records)

    def deliver(stage, messages, gone=()):
        replies = {}
        for u, message in messages.items():
            if u in gone:
                continue
            message = carry(message)
            client = clients[u]
            reply = (client.masked_input(message, vectors[u]) if stage == "masked_input"
                     else getattr(client, stage)(message))
            replies[u] = carry(reply)
        return replies

    messages = server.collect_commitments(deliver("setup", server.setup()))
    messages = server.collect_keys(deliver("advertise", messages))
    messages = server.collect_shares(deliver("share_keys", messages))
    messages = server.collect_masked(deliver("masked_input", messages, gone=gone_at_masked))
    messages = server.collect_signatures(deliver("consistency", messages))
    return server.aggregate(deliver("unmask", messages)), seen


@pytest.mark.parametrize("wire, bits, dtype", [("int8", 11, "uint16"), ("int4", 7, "uint8")])
def test_the_unmasked_sum_is_the_plain_integer_sum_with_a_dropped_site(wire, bits, dtype):
    cfg = _cfg(**{"wire-dtype": wire, "secagg-clip": 0.05})
    q = SecureSum.from_config(cfg)
    cohort = [3, 10, 2**63 + 5, 41, 77]
    assert q.bits(len(cohort)) == bits  # 5 sites x the wire's largest integer cannot wrap
    rng = np.random.default_rng(0)
    received = {"a": rng.normal(size=(2, 6)).astype(np.float32),
                "b": rng.normal(size=9).astype(np.float32)}
    replies = {u: {k: v + rng.normal(scale=0.03, size=v.shape) for k, v in received.items()}
               for u in cohort}
    vectors = {u: q.quantise(replies[u], received, bits) for u in cohort}
    plain = {u: decode(v, bits) for u, v in vectors.items()}
    assert all(np.abs(p).max() <= q.levels for p in plain.values())  # the wire's integers
    config = RoundConfig.create(1, cohort, length=SecureSum.length(SecureSum.layout(received)),
                                bits=bits, degree=COMPLETE, threshold=3)
    total, seen = _round_through_records(config, vectors, gone_at_masked=(41,))
    assert seen == {dtype}
    assert total.survivors == (3, 10, 77, 2**63 + 5)
    expected = sum(plain[u] for u in total.survivors)
    assert np.array_equal(total.signed(), expected)  # exactly, not approximately
    mean = q.mean(total.signed(), len(total.survivors), received)
    flat = expected * (q.clip / q.levels) / len(total.survivors)
    assert np.array_equal(mean["a"], (received["a"].astype(np.float64)
                                      + flat[:12].reshape(2, 6)).astype(np.float32))
    assert np.array_equal(mean["b"], (received["b"].astype(np.float64)
                                      + flat[12:]).astype(np.float32))


@pytest.mark.slow
def test_a_run_on_the_int8_wire_sums_its_integers_and_the_report_weighs_it(
        custom_task, tmp_path, server_sums):  # noqa: F811 (the fixture)
    """A whole run on the int8 wire: the server's sum is the sites' integer sum, the masked
    vectors travel as uint16, every stage's bytes equal its formula; then the same run
    without secure aggregation, and the report of both."""
    run_dir, folder = _run(custom_task, tmp_path, num_nodes=4, **{"wire-dtype": "int8"})
    assert len(server_sums["sums"]) == 2
    for rnd, survivors, total, bits in server_sums["sums"]:
        assert bits == 10 and len(survivors) == 4  # 4 x 127 fits [-2^9, 2^9)
        plain = [_plain(folder, rnd, u) for u in survivors]
        assert all(np.abs(p).max() <= 127 for p in plain)
        assert np.array_equal(total, sum(plain))
    rows = list(csv.DictReader((run_dir / "comms.csv").open()))
    masked = {int(r["bytes"]) for r in rows
              if r["kind"] == "secagg_masked_input" and r["direction"] == "up"}
    assert len(masked) == 1 and masked.pop() == 2 * len(_plain(folder, 1, survivors[0]))
    assert all(r["bytes"] == r["analytic_bytes"] for r in rows)
    assert json.loads((run_dir / "comms.json").read_text())["measured_equals_analytic"]

    plain_dir = run_in_process({
        **custom_task, "lora-rank": 2, "lora-alpha": 4.0, "num-server-rounds": 2,
        "local-steps": 1, "fraction-train": 1.0, "fraction-evaluate": 0.0,
        "aggregator": "fedavg", "wire-dtype": "int8", "run-name": "plain"}, num_nodes=4)
    page = write_report([run_dir, plain_dir], tmp_path / "cmp.html").read_text()
    section = page.split("Secure aggregation overhead", 1)[1].split("<h2>", 1)[0]
    assert "(without)" in section and "x</td>" in section and "also differ" not in section
