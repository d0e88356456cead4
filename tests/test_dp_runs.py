"""Whole private runs: fresh noise every run, and nothing data-dependent on the wire or in
the results outside the guarantee."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora.protocol import METRICS_KEY

from .test_simulation import run_in_process

ALLOWED = {"num-examples", "train-steps"}


def _recording_mod(log_path: str):
    """A client mod that writes the type and metric keys of every reply a client sends
    (clients run in other processes: the file is what they share)."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        metrics = reply.content.get(METRICS_KEY) if not reply.has_error() else None
        with open(log_path, "a") as f:
            f.write(json.dumps([msg.metadata.message_type,
                                sorted(metrics) if metrics is not None else []]) + "\n")
        return reply

    return mod


def _adapter(run_dir) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sample", "update", "client"])
def test_identical_private_runs_release_different_noise_and_nothing_else(
        custom_task, mode, tmp_path):
    base = dict(custom_task, **{"dp-mode": mode, "target-delta": 1e-3, "num-server-rounds": 1,
                                "fraction-train": 1.0, "fraction-evaluate": 0.5})
    log_path = tmp_path / "sent.jsonl"
    runs = [run_in_process(dict(base, **{"run-name": f"{mode}{i}"}), num_nodes=4,
                           mods=[_recording_mod(str(log_path))]) for i in (0, 1)]
    sent = [json.loads(line) for line in log_path.read_text().splitlines()]
    a, b = (_adapter(r) for r in runs)
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # fresh noise in every run

    # On the wire: training replies carry num-examples, train-steps and accounting only;
    # no site evaluated (its validation loss and accuracy would be un-noised).
    assert {t for t, _ in sent} == {"query", "train"}  # the identity query carries no metric
    for _, keys in sent:
        extra = set(keys) - ALLOWED - {k for k in keys if k.startswith("dp-")}
        assert not extra, extra
    # In the results: no training loss, no federated evaluation, no update norms (under
    # user-level DP the server saw raw updates).
    for run in runs:
        rounds = json.loads((run / "metrics.json").read_text())["rounds"]
        for r in rounds[1:]:
            assert r["train_loss"] is None and r["fed_eval_accuracy"] is None
            assert r["test_accuracy"] is not None  # the server's own test set, as ever
            if mode == "client":
                assert r["max_update_norm"] is None
                assert not any("norm" in x["reason"] for x in r["refused"])
        if mode == "client":  # who took part in a round is not named anywhere
            with (run / "comms.csv").open() as f:
                assert {row["node"] for row in csv.DictReader(f)} == {"0"}
            with (run / "privacy.csv").open() as f:
                assert {row["node"] for row in csv.DictReader(f)} == {"server"}


@pytest.mark.slow
def test_identical_runs_without_dp_stay_bit_identical(custom_task):
    base = dict(custom_task, **{"num-server-rounds": 1})
    runs = [run_in_process(dict(base, **{"run-name": f"off{i}"}), num_nodes=4) for i in (0, 1)]
    a, b = (_adapter(r) for r in runs)
    assert all(np.array_equal(a[k], b[k]) for k in a)
