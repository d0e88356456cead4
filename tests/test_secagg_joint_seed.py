"""The neighbour graph's seed, drawn by the clients together (fedlora.secagg.joint_seed): a
server that picks the seed, leaves a reveal out, forges one or shows clients different
commitments gets no graph of its choosing."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedlora.secagg import (
    ProtocolError,
    RoundAborted,
    RoundConfig,
    SecAggClient,
    SecAggServer,
    neighbour_graph,
    run_local_round,
)
from fedlora.secagg.joint_seed import commitment, commitments_digest, joint_seed


def test_a_graph_seed_the_server_ground_for_does_not_draw_the_graph():
    """The server tries seeds until the graph surrounds the target with four parties it
    plays, and sends that seed in the round config: the graph the sites draw is another
    (where the server's seed drew the graph, the target's neighbours would be its four)."""
    cohort, target, sybils = list(range(1, 31)), 1, {27, 28, 29, 30}
    while True:
        chosen = os.urandom(32)
        if set(neighbour_graph(cohort, 4, chosen)[target]) == sybils:
            break
    config = RoundConfig(1, tuple(cohort), 4, 3, 16, 3, chosen)
    seen = []
    for _ in range(2):  # the same config twice: a fresh graph each time
        clients = {u: SecAggClient(u) for u in cohort}
        total = run_local_round(config, {u: np.full(3, u) for u in cohort}, clients=clients)
        assert np.array_equal(total.total, np.full(3, sum(cohort)))
        neighbours = clients[target].neighbours
        assert len(neighbours) == 4 and set(neighbours) != sybils
        seen.append(neighbours)
    assert seen[0] != seen[1]


def _round(n=6, degree=4, threshold=3):
    cohort = list(range(1, n + 1))
    config = RoundConfig.create(1, cohort, length=3, bits=16, degree=degree,
                                threshold=threshold)
    clients = {u: SecAggClient(u) for u in cohort}
    server = SecAggServer(config)
    commits = server.collect_commitments(
        {u: clients[u].setup(m) for u, m in server.setup().items()})
    return config, clients, server, commits


def _advertise(clients, messages):
    return {u: clients[u].advertise(m) for u, m in messages.items()}


def test_the_server_draws_the_same_graph_as_the_sites():
    config, clients, server, commits = _round(8, 2, 2)
    messages = server.collect_keys(_advertise(clients, commits))
    for u, message in messages.items():
        clients[u].share_keys(message)
        assert clients[u].neighbours == frozenset(server.graph[u])
        assert message["keys"].keys() <= set(server.graph[u])


@pytest.mark.parametrize("lie, error", [
    ("forged", "node 2's reveal does not open its commitment"),
    ("left_out", r"missing \[2\]"),
    ("extra", "not committed"),
])
def test_a_server_that_alters_the_reveals_gets_no_graph(lie, error):
    """Changing a reveal, leaving one out (to choose among the seeds its own parties'
    reveals make) or adding one: each client checks every reveal against the commitments
    it kept, and draws no graph from a set it was not shown."""
    config, clients, server, commits = _round()
    messages = server.collect_keys(_advertise(clients, commits))
    shares = dict(messages[1]["seed_shares"])
    if lie == "forged":
        shares[2] = os.urandom(32)
    elif lie == "left_out":
        del shares[2]
    else:
        shares[99] = os.urandom(32)
    with pytest.raises(ProtocolError, match=error):
        clients[1].share_keys({**messages[1], "seed_shares": shares})
    with pytest.raises(ProtocolError):  # and it refuses the rest of the round
        clients[1].share_keys(messages[1])


def test_a_site_that_does_not_reveal_ends_the_round():
    """The server cannot go on without a committed reveal (nor choose to): it aborts."""
    config, clients, server, commits = _round()
    replies = _advertise(clients, commits)
    del replies[4]
    with pytest.raises(RoundAborted, match="no neighbour graph"):
        server.collect_keys(replies)


def test_sites_shown_different_commitments_refuse_each_other():
    """The server hides one commitment from site 1 (its graph would differ): site 1's keys
    are signed over another set of commitments and no one accepts them, nor does site 1
    accept the full set of reveals."""
    config, clients, server, commits = _round(6, "all", 4)  # 1 and 2 are neighbours
    told = {**commits, 1: {"commitments": {v: c for v, c in commits[1]["commitments"].items()
                                           if v != 6}}}
    replies = _advertise(clients, told)
    honest = SecAggServer(config)
    honest.setup()
    honest.collect_commitments({u: {"commitment": c}
                                for u, c in commits[2]["commitments"].items()})
    messages = honest.collect_keys(replies)
    assert 1 not in messages  # the server's own check of its signature fails
    forwarded = {**messages[2], "keys": {**messages[2]["keys"], 1: replies[1]}}
    with pytest.raises(ProtocolError, match="not validly signed"):
        clients[2].share_keys(forwarded)
    with pytest.raises(ProtocolError, match="not committed"):
        clients[1].share_keys(messages[3])


@pytest.mark.parametrize("commitments, error", [
    (lambda c: {v: x for v, x in c.items() if v != 1}, "own"),
    (lambda c: {**c, 1: os.urandom(32)}, "own"),
    (lambda c: {**c, 99: os.urandom(32)}, "not a node of the round's cohort"),
    (lambda c: {**c, 2: b"short"}, "not 32 bytes"),
    (lambda c: {1: c[1], 2: c[2]}, "other sites drew the graph seed"),
])
def test_bad_commitment_sets_are_refused(commitments, error):
    config, clients, server, commits = _round()
    with pytest.raises(ProtocolError, match=error):
        clients[1].advertise({"commitments": commitments(commits[1]["commitments"])})


def test_the_seed_needs_every_reveal_and_binds_the_round():
    config = RoundConfig.create(1, [1, 2, 3], length=2, bits=8)
    later = RoundConfig.create(2, [1, 2, 3], length=2, bits=8)
    reveals = {u: os.urandom(32) for u in (1, 2, 3)}
    commits = {u: commitment(config, u, r) for u, r in reveals.items()}
    seed = joint_seed(config, commits, reveals)
    assert seed == joint_seed(config, commits, dict(reveals))
    other = {**reveals, 3: os.urandom(32)}
    with pytest.raises(ValueError, match="node 3"):
        joint_seed(config, commits, other)
    assert joint_seed(config, {**commits, 3: commitment(config, 3, other[3])}, other) != seed
    assert commitment(later, 1, reveals[1]) != commits[1]  # no reuse in another round
    assert commitment(config, 2, reveals[1]) != commits[1]  # nor under another node id
    assert commitments_digest(config, commits) != commitments_digest(
        config, {v: c for v, c in commits.items() if v != 3})
    assert config.graph_seed != seed


def test_the_whole_round_still_sums_with_dropouts():
    cohort = list(range(1, 11))
    config = RoundConfig.create(1, cohort, length=5, bits=20, degree=6, threshold=4)
    inputs = {u: np.arange(5) * u for u in cohort}
    total = run_local_round(config, inputs, dropouts={"share_keys": [3],
                                                      "masked_input": [7]})
    survivors = [u for u in cohort if u not in (3, 7)]
    assert total.survivors == tuple(survivors)
    assert np.array_equal(total.total, sum(inputs[u] for u in survivors) % 2**20)
