"""A simulated client whose process dies mid-round is dropped, and the run still ends."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from .conftest import write_reviews
from .test_simulation import run_in_process


def _kill_partition_zero_in_round(round_to_die: int):
    """A client mod: the process serving partition 0 kills itself with SIGKILL (as the
    kernel's out-of-memory killer does) when it gets that round's train message."""

    def mod(msg, context, call_next):
        pid = int(context.node_config.get("partition-id", -1))
        config = msg.content.config_records.get("config")
        rnd = int(config.get("server-round", 0)) if config is not None else 0
        if pid == 0 and msg.metadata.message_type == "train" and rnd == round_to_die:
            os.kill(os.getpid(), signal.SIGKILL)
        return call_next(msg, context)

    return mod


def test_a_killed_client_is_dropped_and_the_next_round_has_everyone(tmp_path, tiny_model_dir):
    data = write_reviews(tmp_path / "train.csv", 120, seed=1)
    test = write_reviews(tmp_path / "test.csv", 20, seed=2)
    overrides = {
        "task": "custom", "model-path": str(tiny_model_dir), "data-path": str(data),
        "test-data-path": str(test), "labels": "negative,positive", "lora-rank": 2,
        "lora-alpha": 4.0, "num-server-rounds": 3, "local-steps": 1, "batch-size": 8,
        "fraction-train": 1.0, "fraction-evaluate": 0.0, "max-length": 16,
        "output-dir": str(tmp_path / "results"), "run-name": "dead", "num-partitions": 4,
    }
    run_dir = run_in_process(overrides, num_nodes=4, mods=[_kill_partition_zero_in_round(1)])
    rounds = json.loads((Path(run_dir) / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]  # the run ended
    r1 = rounds[1]
    assert r1["clients_dropped"] == 1 and r1["clients_accepted"] == 3, r1
    assert "process died" in r1["dropped"][0]["reason"], r1["dropped"]
    # The dead worker was replaced: every client (partition 0 included) takes part again.
    for r in rounds[2:]:
        assert r["clients_accepted"] == 4 and r["clients_dropped"] == 0, r
