"""Rounds that go wrong: a simulated client whose process dies mid-round is dropped and the
run goes on; rounds that accept no reply say why, and too many in a row stop the run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from pathlib import Path

import pytest

from fedlora.app.server.empty_rounds import EmptyRounds, RunGoingNowhere, diagnose
from fedlora.app.server.round_outcome import RoundOutcome

from .test_resume import fedlora_log
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


def _small_run(custom_task, **extra) -> dict:
    """The simulation tests' tiny custom run, every client training in every round."""
    return {**custom_task, "lora-rank": 2, "lora-alpha": 4.0, "num-server-rounds": 3,
            "local-steps": 1, "fraction-train": 1.0, "fraction-evaluate": 0.0,
            "run-name": "small", **extra}


@pytest.mark.slow
def test_a_killed_client_is_dropped_and_the_next_round_has_everyone(custom_task):
    overrides = _small_run(custom_task)
    run_dir = run_in_process(overrides, num_nodes=4, mods=[_kill_partition_zero_in_round(1)])
    rounds = json.loads((Path(run_dir) / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]  # the run ended
    r1 = rounds[1]
    assert r1["clients_dropped"] == 1 and r1["clients_accepted"] == 3, r1
    assert "process died" in r1["dropped"][0]["reason"], r1["dropped"]
    # The dead worker was replaced: every client (partition 0 included) takes part again.
    for r in rounds[2:]:
        assert r["clients_accepted"] == 4 and r["clients_dropped"] == 0, r


@pytest.mark.slow
def test_a_run_whose_every_reply_is_refused_says_why_and_stops(custom_task):
    overrides = _small_run(custom_task, **{
        "num-server-rounds": 6, "max-update-norm": 1e-9, "stop-after-empty-rounds": 2})
    with fedlora_log() as records, contextlib.suppress(SystemExit):
        run_in_process(overrides, num_nodes=4)  # (the ServerApp's thread raises SystemExit)
    errors = [x.getMessage() for x in records if x.levelno >= logging.ERROR]
    assert any("stopping after 2 rounds in a row" in e and "(4x)" in e for e in errors), errors
    rounds = json.loads((Path(overrides["output-dir"]) / "small" / "metrics.json")
                        .read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]  # stopped after round 2, its files kept
    for r in rounds[1:]:
        assert r["clients_accepted"] == 0 and r["clients_refused"] == 4
        assert "no reply was accepted" in r["note"] and "raise max-update-norm" in r["note"]
    warnings = [x.getMessage() for x in records
                if x.levelno == logging.WARNING and "no reply was accepted" in x.getMessage()]
    assert len(warnings) == 2  # one line per empty round
    page = (Path(overrides["output-dir"]) / "small" / "report.html").read_text()
    assert "Rounds that changed nothing" in page and "raise max-update-norm" in page


def _outcome(accepted=(), refused=(), dropped=()) -> RoundOutcome:
    nodes = list(accepted) + [n for n, _ in refused] + [n for n, _ in dropped]
    return RoundOutcome(sampled=len(nodes), sampled_nodes=nodes, accepted=list(accepted),
                        refused=list(refused), dropped=list(dropped))


def test_empty_rounds_count_only_rounds_in_a_row():
    watch = EmptyRounds(limit=2)
    died = _outcome(dropped=[(1, "the client's process died (killed, e.g. for memory)"),
                             (2, "no reply before the round's timeout (round-timeout)"),
                             (3, "the client's process died (killed, e.g. for memory)")])
    note = watch.observe(1, died)
    assert "0 refused, 3 dropped" in note and "(2x): the client's process died" in note
    assert "lower max-physical-batch-size" in note
    watch.check(note)  # one empty round: the run goes on
    assert watch.observe(2, _outcome(accepted=[1], refused=[(2, "x")])) is None  # resets
    watch.check(None)
    watch.check(watch.observe(3, died))
    with pytest.raises(RunGoingNowhere, match="2 rounds in a row"):
        watch.check(watch.observe(4, died))
    never = EmptyRounds(limit=0)
    for rnd in range(1, 10):
        never.check(never.observe(rnd, died))  # 0: never stops
    assert diagnose(1, _outcome()) is None  # no one sampled: nothing to say
    hidden = EmptyRounds(limit=1, enabled=False)  # dp-mode = client: fates are withheld
    assert hidden.observe(1, died) is None
