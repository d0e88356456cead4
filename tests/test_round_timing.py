"""Every second of a round accounted for, evaluation every k rounds, a report with every run."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from fedlora.config import ConfigError
from fedlora.runtime import parse_run_config
from fedlora.timing import PHASES, RoundTimer

from .test_simulation import run_in_process


def test_timer_splits_the_round_into_phases_and_the_rest():
    timer = RoundTimer()
    with timer.phase("train_exchange"):
        time.sleep(0.05)
    with timer.phase("central_eval"):
        time.sleep(0.02)
    time.sleep(0.01)  # outside every phase: "other"
    timer.add_clients([{"setup-seconds": 0.5, "compute-seconds": 2.0},
                       {"setup-seconds": 0.25, "compute-seconds": True}])  # a bool is no time
    b = timer.breakdown()
    assert b["train_exchange"] >= 0.05 and b["central_eval"] >= 0.02
    assert b["other"] >= 0.01
    assert sum(b[k] for k in (*PHASES, "other")) == pytest.approx(b["total"], abs=0.005)
    assert b["client_setup"] == 0.75 and b["client_train"] == 2.0 and b["client_eval"] == 0.0
    line = RoundTimer.line(b)
    assert "train exchange" in line and "%" in line and "setup 0.8" in line
    with pytest.raises(ValueError, match="unknown round phase"):
        with timer.phase("lunch"):
            pass


def test_evaluate_every_is_validated():
    assert parse_run_config({"evaluate-every": 3}).evaluate_every == 3
    with pytest.raises(ConfigError, match="'evaluate-every'"):
        parse_run_config({"evaluate-every": 0})


@pytest.mark.slow
def test_a_run_times_its_rounds_evaluates_every_k_and_writes_its_report(custom_task):
    overrides = dict(custom_task, **{"num-server-rounds": 3, "evaluate-every": 2,
                                     "run-name": "timed"})
    run = run_in_process(overrides, num_nodes=4)
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    evaluated = [r["round"] for r in rounds[1:] if r["test_accuracy"] is not None]
    assert evaluated == [2, 3]  # every second round, and the last one
    assert [r["round"] for r in rounds[1:] if r["fed_eval_accuracy"] is not None] == [2, 3]
    for r in rounds[1:]:
        t = r["timing"]
        assert t["total"] == r["round_seconds"] > 0
        assert sum(t[k] for k in (*PHASES, "other")) == pytest.approx(t["total"], abs=0.01)
        assert t["train_exchange"] > 0 and t["writing"] > 0
        assert t["client_train"] > 0 and t["client_setup"] > 0  # no DP: clients say
        assert (t["central_eval"] > 0) == (r["round"] in evaluated)
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    # Evaluating less often changes nothing about training: the same adapter, bit for bit.
    every = run_in_process(dict(overrides, **{"evaluate-every": 1, "run-name": "every"}),
                           num_nodes=4)
    from safetensors.numpy import load_file

    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (run, every))
    assert all(np.array_equal(a[k], b[k]) for k in a)
