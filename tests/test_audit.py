"""Communication audit: measured bytes equal the analytic count; foreign keys are caught."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array

from .test_simulation import run_in_process

FOREIGN = "base_model.model.bert.embeddings.word_embeddings.weight"


def _leaky_mod(msg, context, call_next):
    """A client that tries to send a base weight along with its adapter."""
    reply = call_next(msg, context)
    if msg.metadata.message_type == "train" and "lora" in reply.content:
        reply.content["lora"][FOREIGN] = Array(np.zeros((4, 4), dtype=np.float32))
    return reply


@pytest.mark.slow
@pytest.mark.parametrize("wire,size", [("float32", 4), ("float16", 2)])
def test_ledger_bytes_equal_the_analytic_count(custom_task, wire, size):
    overrides = dict(custom_task, **{"wire-dtype": wire, "run-name": f"wire-{wire}",
                                     "fraction-evaluate": 0.0})
    run_dir = run_in_process(overrides, num_nodes=4)
    rows = list(csv.DictReader((run_dir / "comms.csv").open()))
    assert rows and all(r["wire_dtype"] == wire for r in rows)
    assert all(int(r["bytes"]) == int(r["analytic_bytes"]) for r in rows)
    for r in rows:  # per array: its serialised bytes, in the order of the keys
        sizes = [int(x) for x in r["array_bytes"].split(";")]
        assert len(sizes) == len(r["keys"].split(";")) and sum(sizes) == int(r["bytes"])
    # Independent: element count of the adapter (rank 4, hidden 32, 2 layers x 2 modules,
    # head 2 x 32 + 2) times the dtype size.
    numel = 2 * 2 * 4 * (32 + 32) + 2 * 32 + 2
    assert {int(r["bytes"]) for r in rows} == {numel * size}


@pytest.mark.slow
def test_a_foreign_key_fails_the_run_naming_it(custom_task):
    overrides = dict(custom_task, **{"run-name": "leak", "fraction-evaluate": 0.0})
    with pytest.raises(Exception) as err:
        run_in_process(overrides, num_nodes=4, mods=[_leaky_mod])
    assert FOREIGN in str(err.value)
    run_dir = Path(custom_task["output-dir"]) / "leak"
    comms = (run_dir / "comms.csv").read_text()
    assert FOREIGN in comms  # the ledger shows what was sent
    # The run stopped in round 1: no aggregated adapter was ever written.
    assert not (run_dir / "adapter").exists()
    assert [r["round"] for r in json.loads((run_dir / "metrics.json").read_text())["rounds"]] == [0]


@pytest.mark.slow
def test_foreign_keys_refuse_mode_drops_the_reply(custom_task):
    overrides = dict(custom_task, **{"run-name": "leak-refuse", "fraction-evaluate": 0.0,
                                     "foreign-keys": "refuse"})
    run_dir = run_in_process(overrides, num_nodes=4, mods=[_leaky_mod])
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert all(r["clients_accepted"] == 0 and r["clients_refused"] == 2 for r in rounds[1:])
    assert all(FOREIGN in x["reason"] for r in rounds[1:] for x in r["refused"])


def _float16_mod(msg, context, call_next):
    """A client that sends its factors in another dtype than the run's wire dtype."""
    from fedlora.wire import from_record, to_record

    reply = call_next(msg, context)
    if msg.metadata.message_type == "train" and "lora" in reply.content:
        reply.content["lora"] = to_record(from_record(reply.content["lora"]), "float16")
    return reply


@pytest.mark.slow
def test_a_reply_in_the_wrong_dtype_is_refused(custom_task):
    overrides = dict(custom_task, **{"run-name": "dtype", "fraction-evaluate": 0.0})
    run_dir = run_in_process(overrides, num_nodes=4, mods=[_float16_mod])
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert all(r["clients_accepted"] == 0 for r in rounds[1:])
    assert all("dtype float16, expected float32" in x["reason"] for r in rounds[1:]
               for x in r["refused"])
