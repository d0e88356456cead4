"""Server checkpoints and ``resume=true``: a stopped run continues from its last finished round."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fedlora.aggregation import get_method
from fedlora.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    config_differences,
    find_resumable,
    load_checkpoint,
    save_checkpoint,
)
from fedlora.config import ConfigError, defaults
from fedlora.runtime import parse_run_config
from simulations.harness import read_metrics, run_inprocess

ROOT = Path(__file__).resolve().parents[1]


def _ckpt(rnd: int = 2, **config) -> Checkpoint:
    rng = np.random.default_rng(3)
    return Checkpoint(
        round=rnd, config=dict(defaults(), **config),
        global_state={"m.lora_A.weight": rng.normal(size=(4, 6)).astype(np.float32),
                      "m.lora_B.weight": rng.normal(size=(5, 4)).astype(np.float32)},
        method_state={"cumulative/m/B": rng.normal(size=(5, 8)).astype(np.float32)},
        rng_state=np.random.default_rng(7).bit_generator.state,
        rows=[{"round": 0, "test_accuracy": 0.5}, {"round": 1, "test_accuracy": 0.6,
                                                   "refused": [{"node": 2**63 + 5, "reason": "x"}]}],
        comms_rows=[{"round": 1, "node": 1, "direction": "up", "bytes": 10}],
        privacy_rows=[{"round": 1, "node": 1, "epsilon": 0.3}],
        extra={"method": {"rounds": 1}})


def test_checkpoint_round_trip_is_exact(tmp_path):
    ck = _ckpt()
    save_checkpoint(tmp_path, ck)
    back = load_checkpoint(tmp_path)
    assert back.round == 2 and back.config == ck.config
    for part in ("global_state", "method_state"):
        a, b = getattr(ck, part), getattr(back, part)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])
    assert back.rows == ck.rows and back.comms_rows == ck.comms_rows
    assert back.privacy_rows == ck.privacy_rows and back.extra == ck.extra
    # The sampling RNG continues exactly where it stopped.
    g1, g2 = np.random.default_rng(), np.random.default_rng()
    g1.bit_generator.state, g2.bit_generator.state = ck.rng_state, back.rng_state
    assert np.array_equal(g1.integers(0, 10**9, 20), g2.integers(0, 10**9, 20))
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_damaged_or_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    path = save_checkpoint(tmp_path, _ckpt())
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path)


def test_tampered_arrays_fail_the_checksum(tmp_path):
    ck = _ckpt()
    path = save_checkpoint(tmp_path, ck)
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    data["global/m.lora_A.weight"] = data["global/m.lora_A.weight"] + 1
    with path.open("wb") as f:
        np.savez(f, **data)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path)


def test_find_resumable(tmp_path):
    with pytest.raises(CheckpointError, match="no run with a checkpoint"):
        find_resumable(tmp_path, "")
    save_checkpoint(tmp_path / "old", _ckpt())
    time.sleep(0.02)
    save_checkpoint(tmp_path / "new", _ckpt())
    os.utime(tmp_path / "old" / CHECKPOINT_FILE, (1, 1))
    assert find_resumable(tmp_path, "") == (tmp_path / "new").resolve()
    assert find_resumable(tmp_path, "old") == (tmp_path / "old").resolve()
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        find_resumable(tmp_path, "missing")


def test_only_harmless_keys_may_change_on_resume():
    saved = defaults()
    assert config_differences(saved, dict(saved, **{"num-server-rounds": 20, "resume": True,
                                                     "round-timeout": 30.0})) == []
    assert config_differences(saved, dict(saved, **{"lora-rank": 4, "seed": 1})) == \
        ["lora-rank", "seed"]


@pytest.mark.parametrize("name,options", [("stack", {}), ("svd", {"error_feedback": True})])
def test_method_state_survives_a_checkpoint(name, options):
    rng = np.random.default_rng(0)
    method = get_method(name, alpha=8.0, rank=2, **options)
    glob = {"m.lora_A.weight": rng.normal(size=(2, 6)).astype(np.float32),
            "m.lora_B.weight": rng.normal(size=(5, 2)).astype(np.float32)}
    replies = [{"m.lora_A.weight": rng.normal(size=(2, 6)).astype(np.float32),
                "m.lora_B.weight": rng.normal(size=(5, 2)).astype(np.float32)} for _ in range(3)]
    glob = method.aggregate(replies, [1, 2, 3], glob)
    arrays, values = method.checkpoint_state()
    assert arrays, f"{name} keeps state across rounds"
    fresh = get_method(name, alpha=8.0, rank=2, **options)
    fresh.restore_state(*[dict(arrays), json.loads(json.dumps(values))])
    again, _ = fresh.checkpoint_state()
    assert arrays.keys() == again.keys()
    assert all(np.allclose(arrays[k], again[k]) for k in arrays)
    # The restored method continues exactly like the original.
    more = [{k: v * 0.5 for k, v in r.items()} for r in replies]
    out1 = method.aggregate(more, [1, 1, 1], glob)
    out2 = fresh.aggregate(more, [1, 1, 1], glob)
    p1, p2 = method.payload(out1), fresh.payload(out2)
    assert p1.keys() == p2.keys() and all(np.allclose(p1[k], p2[k], atol=1e-6) for k in p1)


def test_methods_without_state_refuse_foreign_arrays():
    with pytest.raises(ValueError, match="keeps no arrays"):
        get_method("fedavg", alpha=8.0, rank=2).restore_state({"x": np.zeros(1)}, {})


def test_resume_config_key():
    assert parse_run_config({"resume": "true", "round-timeout": 12}).resume is True
    with pytest.raises(ConfigError, match="round-timeout"):
        parse_run_config({"round-timeout": -1})


# -- a real run stopped after round 1 and resumed -------------------------------------------

RUN_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from simulations.harness import run_inprocess
    run_inprocess(json.loads({overrides!r}), num_nodes=4, total_cpus=2)
""")


@contextlib.contextmanager
def fedlora_log():
    """The records the ``fedlora`` logger emits inside the block."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("fedlora")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _adapter(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_stopped_run_resumes_from_its_last_round(custom_task, tmp_path):
    base = dict(custom_task, **{"num-server-rounds": 3, "fraction-train": 1.0,
                                "fraction-evaluate": 0.0, "lora-dropout": 0.0,
                                "aggregator": "stack"})
    # The reference: the same run, uninterrupted.
    ref = run_inprocess(dict(base, **{"run-name": "whole"}), num_nodes=4, total_cpus=2)

    # Stop the server (and its whole simulation) as soon as round 1 is checkpointed.
    overrides = dict(base, **{"run-name": "stopped"})
    run_dir = Path(overrides["output-dir"]) / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT.format(root=str(ROOT), overrides=json.dumps(overrides))],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(CheckpointError):
                if load_checkpoint(run_dir).round >= 1:
                    break
            assert proc.poll() is None, "the run ended before it could be stopped"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    stopped = load_checkpoint(run_dir)
    assert stopped.round == 1, "killed right after round 1"
    round1_adapter = stopped.global_state

    with fedlora_log() as records:
        run_inprocess(dict(overrides, resume=True), num_nodes=4, total_cpus=2)
    resumed_log = [r.getMessage() for r in records if "resuming" in r.getMessage()]
    assert resumed_log and "after round 1 of 3" in resumed_log[0], resumed_log

    metrics = read_metrics(run_dir)
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2, 3]
    (resume,) = metrics["resumes"]
    assert resume["after_round"] == 1
    # The resumed server started from the round-1 adapter: re-evaluated, it scores exactly
    # what round 1 recorded.
    assert resume["test_accuracy"] == metrics["rounds"][1]["test_accuracy"]
    assert resume["test_loss"] == pytest.approx(metrics["rounds"][1]["test_loss"], rel=1e-6)
    assert resume["test_loss"] != pytest.approx(metrics["rounds"][2]["test_loss"], rel=1e-6)
    comms_rounds = {int(r["round"]) for r in load_checkpoint(run_dir).comms_rows}
    assert comms_rounds == {1, 2, 3}
    final = load_checkpoint(run_dir)
    assert final.round == 3
    assert not all(np.array_equal(round1_adapter[k], final.global_state[k])
                   for k in round1_adapter)

    # Training is seeded by round and partition, and every node trains every round, so the
    # stopped-and-resumed run ends where the uninterrupted one did (stack's state included).
    a, b = _adapter(ref), _adapter(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert read_metrics(ref)["rounds"][3]["test_accuracy"] == \
        metrics["rounds"][3]["test_accuracy"]
    # (A private run cannot end bit-identical: its noise is fresh in every run. That its
    # clients charge the rounds before a restart is tested in test_dp.py.)

    # Resuming a finished run does nothing more; resuming under another model config fails.
    run_inprocess(dict(overrides, resume=True), num_nodes=4, total_cpus=2)
    assert load_checkpoint(run_dir).round == 3
    before = read_metrics(run_dir)
    assert before["rounds"] == metrics["rounds"]
    with fedlora_log() as records, contextlib.suppress(SystemExit):
        run_inprocess(dict(overrides, resume=True, **{"lora-rank": 2}), num_nodes=4,
                      total_cpus=2)
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert any("'lora-rank'" in e and "checkpoint" in e for e in errors), errors
    assert load_checkpoint(run_dir).round == 3 and read_metrics(run_dir) == before
