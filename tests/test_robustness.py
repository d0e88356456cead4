"""A server that survives bad clients, bad input and being killed."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.config import KEYS, ConfigError
from fedlora.runtime import parse_run_config
from fedlora.wire import from_record, to_record

from .test_simulation import run_in_process

ROOT = Path(__file__).resolve().parents[1]
FOREIGN = "base_model.model.bert.embeddings.word_embeddings.weight"

# partition-id -> what that client does to its training reply
ATTACKS = {0: "nan", 1: "inf", 2: "shape", 3: "extra", 4: "scale", 5: "zero", 6: "negative"}
REASONS = {"nan": "non-finite", "inf": "non-finite", "shape": "shape", "extra": FOREIGN,
           "scale": "max-update-norm", "zero": "num-examples 0", "negative": "num-examples -5"}


def attack_mod(msg, context, call_next):
    reply = call_next(msg, context)
    attack = ATTACKS.get(int(context.node_config.get("partition-id", -1)))
    if msg.metadata.message_type != "train" or attack is None or "lora" not in reply.content:
        return reply
    state = from_record(reply.content["lora"])
    first = sorted(k for k in state if k.endswith("lora_A.weight"))[0]
    if attack in ("nan", "inf"):
        state[first][0, 0] = np.nan if attack == "nan" else np.inf
    elif attack == "shape":
        state[first] = np.zeros((3, 3), np.float32)
    elif attack == "extra":
        state[FOREIGN] = np.zeros((4, 4), np.float32)
    elif attack == "scale":
        state = {k: v * 1000 for k, v in state.items()}
    elif attack in ("zero", "negative"):
        reply.content["metrics"]["num-examples"] = 0 if attack == "zero" else -5
    reply.content["lora"] = to_record(state)
    return reply


@pytest.mark.slow
def test_broken_and_malicious_replies_are_refused(custom_task):
    common = dict(custom_task, **{"fraction-train": 1.0, "fraction-evaluate": 0.0,
                                  "foreign-keys": "refuse", "num-partitions": 10,
                                  "learning-rate": 0.01})
    clean = run_in_process(dict(common, **{"run-name": "clean"}), num_nodes=10)
    attacked = run_in_process(dict(common, **{"run-name": "attacked"}), num_nodes=10,
                              mods=[attack_mod])
    rounds = json.loads((attacked / "metrics.json").read_text())["rounds"]
    for r in rounds[1:]:
        assert r["clients_accepted"] == 3 and r["clients_refused"] == 7
        reasons = " | ".join(x["reason"] for x in r["refused"])
        for attack, fragment in REASONS.items():
            assert fragment in reasons, (attack, reasons)
    # The global adapter stays finite and as good as the clean run's.
    from safetensors.numpy import load_file

    tensors = load_file(str(attacked / "adapter" / "adapter_model.safetensors"))
    assert all(np.isfinite(t).all() for t in tensors.values())
    clean_acc = json.loads((clean / "metrics.json").read_text())["rounds"][-1]["test_accuracy"]
    assert abs(rounds[-1]["test_accuracy"] - clean_acc) <= 0.1


@pytest.mark.slow
def test_too_few_valid_replies_skip_the_round_cleanly(custom_task):
    overrides = dict(custom_task, **{"fraction-train": 1.0, "fraction-evaluate": 0.0,
                                     "min-train-nodes": 2, "num-partitions": 10,
                                     "run-name": "skip", "foreign-keys": "refuse"})
    # Partitions 0-6 attack, only partition 7 is honest: one valid reply, two needed.
    run_dir = run_in_process(dict(overrides, **{"num-partitions": 8}), num_nodes=8,
                             mods=[attack_mod])
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert all(r["clients_accepted"] == 1 and r["train_loss"] is None for r in rounds[1:])
    first = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert first[1]["test_accuracy"] == first[0]["test_accuracy"]  # the adapter did not move


# -- the run-config parser never lets a bad value through, and never crashes ------------

_values = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.lists(st.integers(), max_size=2))
_keys = st.one_of(st.sampled_from([k.name for k in KEYS]), st.text(max_size=15))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=4))
def test_fuzzed_run_configs_parse_or_fail_with_a_named_key(config):
    try:
        cfg = parse_run_config(config)
    except ConfigError as e:
        assert e.key in config and f"'{e.key}'" in str(e)
        assert "expected" in str(e)
    else:
        for k, v in cfg.to_dict().items():
            spec = next(x for x in KEYS if x.name == k)
            assert isinstance(v, spec.kind) and spec.check(v)


# -- killed mid-run: every result file is complete and loads ---------------------------

KILL_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from simulations.harness import run_inprocess
    run_inprocess(json.loads({overrides!r}), num_nodes=4, total_cpus=2)
""")


@pytest.mark.slow
def test_sigkill_mid_run_leaves_complete_results(custom_task, tmp_path):
    overrides = dict(custom_task, **{"num-server-rounds": 30, "fraction-evaluate": 0.0,
                                     "run-name": "killed"})
    script = KILL_SCRIPT.format(root=str(ROOT), overrides=json.dumps(overrides))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run_dir = Path(overrides["output-dir"]) / "killed"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                done = len(json.loads((run_dir / "metrics.json").read_text())["rounds"]) - 1
            except (OSError, ValueError):
                done = 0
            if done >= 3:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its whole simulation
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    files = [p for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert {p.name for p in files} >= {"metrics.json", "metrics.csv", "comms.csv", "comms.json",
                                      "config.json", "adapter_model.safetensors"}
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    json.loads((run_dir / "comms.json").read_text())
    json.loads((run_dir / "config.json").read_text())
    for name in ("metrics.csv", "comms.csv"):
        rows = list(csv.DictReader((run_dir / name).open()))
        assert rows and all(None not in r for r in rows)  # no short or torn rows
    assert len(list(csv.DictReader((run_dir / "metrics.csv").open()))) == len(rounds)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(custom_task["model-path"],
                                                              num_labels=2)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_diverged_update_is_a_refusal_with_its_reason_on_every_wire(
        custom_task, identity, monkeypatch):
    """A site whose training diverged says so; on an int8 wire, whose encoder cannot hold
    non-finite values, it used to fail outright and be counted as dropped."""
    from flwr.app import Context, RecordDict

    import fedlora.app.client.client_app as client_app
    from fedlora.protocol import LORA_KEY, STATUS_KEY
    from fedlora.training import TrainResult

    from .test_dp_attacks import _train_message

    def diverged(cfg, model, data, method, plan, seed, server_round):
        reply = method.reply(model)
        first = sorted(reply)[0]
        reply[first] = np.full_like(reply[first], np.nan)
        return reply, TrainResult(loss=float("nan"), steps=1, examples=1)

    monkeypatch.setattr(client_app, "_train_and_release", diverged)
    node = {"partition-id": 0, "num-partitions": 4}
    for wire in ("float32", "int8"):
        run_config = dict(custom_task, **{"wire-dtype": wire})
        context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run_config,
                          node_config=node)
        reply = client_app.train_fn(_train_message(run_config), context)
        assert LORA_KEY not in reply.content
        assert reply.content[STATUS_KEY]["status"] != "ok"
        assert "diverged" in reply.content[STATUS_KEY]["reason"], wire
    # Under DP the site says only that it could not train, and the round stays charged.
    run_config = dict(custom_task, **{"wire-dtype": "int8", "dp-mode": "update",
                                      "target-delta": 1e-3})
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run_config,
                      node_config=node)
    reply = client_app.train_fn(_train_message(run_config), context)
    assert LORA_KEY not in reply.content
    assert reply.content[STATUS_KEY]["reason"] == client_app.PRIVATE_FAILURE
    assert "diverged" not in str(reply.content)
    spent = context.state[client_app.PRIVACY_STATE_KEY]
    assert spent["total_steps"] == 1  # update mode: the round's one release, charged
