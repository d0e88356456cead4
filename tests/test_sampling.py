"""Client sampling that repeats across runs: nodes are ordered by their partition-id
(asked with a query message), not by Flower's node ids, which are new in every run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Message

from fedlora.app.server.strategy import LoraStrategy
from fedlora.protocol import IDENTITY_KEY, identity_reply
from simulations.harness import run_inprocess


class _Grid:
    """A grid whose nodes answer the identity query (or not) and record what they got."""

    def __init__(self, partitions: dict[int, int | None], silent: set[int] = frozenset()):
        self.partitions = partitions
        self.silent = silent
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.partitions)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            self.sent.append(m)
            node = m.metadata.dst_node_id
            if node in self.silent:
                continue
            pid = self.partitions[node]
            content = identity_reply({} if pid is None else {"partition-id": pid})
            reply = Message(content=content, reply_to=m)
            assert reply.metadata.src_node_id == node
            replies.append(reply)
        return replies


def _strategy(seed: int = 0) -> LoraStrategy:
    method = SimpleNamespace(payload=lambda s: s)
    return LoraStrategy(method=method, template={}, fraction_train=0.5, fraction_evaluate=0.0,
                        min_train_nodes=1, seed=seed)


def test_identity_reply_says_the_partition_and_nothing_else():
    rec = identity_reply({"partition-id": 7, "data-path": "/secret.csv"})[IDENTITY_KEY]
    assert dict(rec) == {"partition-id": 7}
    assert dict(identity_reply({"data-path": "/secret.csv"})[IDENTITY_KEY]) == {}


def test_sampling_follows_partition_ids_whatever_the_node_ids(identity):
    picked = []
    for node_ids in ([901, 17, 5555, 42, 3, 77], [12, 999999, 4, 610, 88, 2000]):
        grid = _Grid({n: pid for pid, n in enumerate(node_ids)})
        strategy = _strategy()
        assert strategy.identify_nodes(grid) == 6
        assert all(m.metadata.message_type == "query" for m in grid.sent)
        assert all(not m.content.array_records for m in grid.sent)  # nothing but the question
        rounds = [[grid.partitions[n] for n in strategy._sample(grid, 0.5, 1)]
                  for _ in range(4)]
        picked.append(rounds)
    assert picked[0] == picked[1]  # the same partitions in every round of both "runs"


def test_unidentified_nodes_come_after_by_id(identity):
    grid = _Grid({50: 1, 10: None, 30: 0, 20: 2}, silent={20})
    strategy = _strategy()
    assert strategy.identify_nodes(grid) == 2
    assert strategy._ordered([10, 20, 30, 50]) == [30, 50, 10, 20]


def _run(overrides: dict, tmp_path, name: str, log_path):
    def mod(msg, context, call_next):
        if msg.metadata.message_type == "train":
            with open(log_path, "a") as f:
                f.write(json.dumps({"run": name, "partition": context.node_config["partition-id"],
                                    "round": msg.content["config"]["server-round"]}) + "\n")
        return call_next(msg, context)

    run_dir = run_inprocess({**overrides, "run-name": name}, num_nodes=6, mods=[mod],
                            total_cpus=2)
    return run_dir


@pytest.mark.slow
def test_two_runs_sample_the_same_partitions_and_end_identical(custom_task, tmp_path):
    log_path = tmp_path / "trained.jsonl"
    overrides = dict(custom_task, **{"num-partitions": 6, "fraction-train": 0.34,
                                     "fraction-evaluate": 0.0, "num-server-rounds": 3})
    dirs = [_run(overrides, tmp_path, name, log_path) for name in ("first", "second")]
    events = [json.loads(line) for line in log_path.read_text().splitlines()]

    def sampled(name):
        by_round: dict[int, set] = {}
        for e in events:
            if e["run"] == name:
                by_round.setdefault(e["round"], set()).add(e["partition"])
        return by_round

    first, second = sampled("first"), sampled("second")
    assert sorted(first) == [1, 2, 3] and all(len(p) == 2 for p in first.values())
    assert first == second
    assert len({frozenset(p) for p in first.values()}) > 1  # sampling does vary by round
    arrays = [np.load(d / "checkpoint.npz") for d in dirs]
    weights = [k for k in arrays[0].files if "lora" in k]
    assert weights and all(np.array_equal(arrays[0][k], arrays[1][k]) for k in weights)
