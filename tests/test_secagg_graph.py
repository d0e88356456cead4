"""The SecAgg+ neighbour graph and its parameters (fedlora.secagg.graph)."""

from __future__ import annotations

import os

import pytest

from fedlora.secagg.graph import (
    check_parameters,
    choose_parameters,
    neighbour_graph,
    resolve_degree,
    resolve_threshold,
)


def connected(graph: dict[int, tuple[int, ...]]) -> bool:
    start = next(iter(graph))
    seen, todo = {start}, [start]
    while todo:
        for v in graph[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return len(seen) == len(graph)


@pytest.mark.parametrize("n,degree", [(10, 4), (31, 6), (50, 10), (9, 2)])
def test_graph_is_regular_symmetric_and_shared(n, degree):
    cohort = [1000 + 7 * i for i in range(n)]
    seed = os.urandom(32)
    graph = neighbour_graph(cohort, degree, seed)
    assert set(graph) == set(cohort)
    for u, vs in graph.items():
        assert len(vs) == degree and u not in vs
        assert all(u in graph[v] for v in vs)
    assert connected(graph)
    # everyone computes the same graph from the public inputs, whatever the cohort's order
    assert neighbour_graph(list(reversed(cohort)), degree, seed) == graph
    assert neighbour_graph(cohort, degree, os.urandom(32)) != graph


def test_complete_graph():
    cohort = [3, 1, 2, 9]
    graph = neighbour_graph(cohort, 3, os.urandom(32))
    assert graph == {1: (2, 3, 9), 2: (1, 3, 9), 3: (1, 2, 9), 9: (1, 2, 3)}
    assert resolve_degree(4, "all") == 3
    assert resolve_degree(4, 10) == 3


def test_graph_rejects_bad_inputs():
    with pytest.raises(ValueError, match="twice"):
        neighbour_graph([1, 1, 2], 2, os.urandom(32))
    with pytest.raises(ValueError, match="degree"):
        neighbour_graph(range(10), 3, os.urandom(32))
    with pytest.raises(ValueError, match="seed"):
        neighbour_graph(range(10), 4, b"short")


def test_default_parameters():
    assert choose_parameters(10) == (9, 6)  # small cohorts: the complete graph (SecAgg)
    k, t = choose_parameters(1000)
    assert k % 2 == 0 and 30 <= k <= 50 and k / 2 < t <= k
    k2, _ = choose_parameters(100_000)
    assert k < k2 < 100  # logarithmic growth
    assert choose_parameters(2) == (1, 1)


def test_threshold_fraction_and_count():
    assert resolve_threshold(10, 0.7) == 7
    assert resolve_threshold(9, 2 / 3) == 6
    assert resolve_threshold(10, 1.0) == 10
    assert resolve_threshold(10, 0.51) == 6
    assert resolve_threshold(10, 6) == 6
    for bad in (0.5, 0.3, 1.5, 5, 11, 0, True, "7"):
        with pytest.raises(ValueError):
            resolve_threshold(10, bad)


def test_check_parameters():
    check_parameters(12, 6, 4)
    check_parameters(12, 11, 6)
    for degree, threshold in ((5, 3), (12, 7), (6, 3), (6, 7), (0, 1)):
        with pytest.raises(ValueError):
            check_parameters(12, degree, threshold)
    for bad in (3, 0, -2, True, 2.0):
        with pytest.raises(ValueError):
            resolve_degree(12, bad)
