"""The SecAgg+ neighbour graph and its parameters (degree, threshold).

SecAgg (Bonawitz et al. 2017) makes every pair of clients share a mask and every client
secret-share its keys with all the others: O(n^2) work. SecAgg+ (Bell et al. 2020) does the
same over a sparse random graph of degree k = O(log n): a client masks with, and shares
its secrets among, its k neighbours only, with reconstruction threshold t.

The graph is a Harary graph: the cohort is placed on a ring in a random order and each
client is joined to the k/2 nearest clients on either side. The order is the sort of the
cohort by ChaCha20 words expanded from a public 32-byte graph seed, so every party computes
the same graph from the same seed. The seed must be drawn so that nobody can choose it: a
party choosing the graph could surround a client with colluders. The clients draw it
together (:mod:`fedlora.secagg.joint_seed`). A degree of at least n - 1 (or ``"all"``) is the complete graph,
that is SecAgg itself.

The threshold t must exceed k/2: the shares of one client's secrets then cannot be
reconstructed by two disjoint sets of its neighbours, so the server cannot learn both its
self-mask seed (from some neighbours) and its mask key (from others). Defaults, a heuristic
in the spirit of Bell et al. (pick k from their analysis for formal guarantees): k is the
smallest even number >= :data:`DEGREE_LOG_FACTOR` * log2(n), t = ceil(2k/3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from .masks import keystream

__all__ = ["COMPLETE", "DEFAULT_THRESHOLD_FRACTION", "DEGREE_LOG_FACTOR", "check_parameters",
           "choose_parameters", "neighbour_graph", "resolve_degree", "resolve_threshold"]

#: Degree value meaning the complete graph (every other client is a neighbour).
COMPLETE = "all"
#: Default degree: the smallest even number >= this factor times log2 of the cohort size.
DEGREE_LOG_FACTOR = 4
#: Default threshold as a fraction of the degree.
DEFAULT_THRESHOLD_FRACTION = Fraction(2, 3)


def _check_cohort_size(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"a cohort needs at least 2 clients, got {n!r}")


def resolve_degree(n: int, degree: int | str | None = None) -> int:
    """The degree for a cohort of ``n``: default, ``"all"`` (n - 1), or a checked even int."""
    _check_cohort_size(n)
    if degree is None:
        degree = 2 * math.ceil(DEGREE_LOG_FACTOR * math.log2(n) / 2)
    elif degree == COMPLETE:
        return n - 1
    elif isinstance(degree, bool) or not isinstance(degree, int) or degree < 2 or degree % 2:
        raise ValueError(f"degree must be an even integer >= 2 or {COMPLETE!r}, got {degree!r}")
    return min(degree, n - 1)


def resolve_threshold(degree: int, threshold: int | float | None = None) -> int:
    """The threshold count for ``degree``: default, a fraction in (0.5, 1], or a count.

    The count must satisfy degree/2 < t <= degree.
    """
    if threshold is None:
        count = math.ceil(DEFAULT_THRESHOLD_FRACTION * degree)
    elif isinstance(threshold, float):
        fraction = Fraction(repr(threshold))
        if not Fraction(1, 2) < fraction <= 1:
            raise ValueError(f"a threshold fraction must lie in (0.5, 1], got {threshold!r}")
        count = math.ceil(fraction * degree)
    elif isinstance(threshold, int) and not isinstance(threshold, bool):
        count = threshold
    else:
        raise ValueError(f"threshold must be a fraction or an integer count, got {threshold!r}")
    if not degree / 2 < count <= degree:
        raise ValueError(f"threshold {count} must exceed half the degree ({degree}) and not "
                         "exceed it: otherwise two disjoint sets of neighbours could both "
                         "reconstruct a client's secrets")
    return count


def choose_parameters(n: int, degree: int | str | None = None,
                      threshold: int | float | None = None) -> tuple[int, int]:
    """``(degree, threshold)`` for a cohort of ``n`` clients (defaults in the docstring)."""
    k = resolve_degree(n, degree)
    return k, resolve_threshold(k, threshold)


def _check_degree(n: int, degree: int) -> None:
    _check_cohort_size(n)
    if isinstance(degree, bool) or not isinstance(degree, int) \
            or not (degree == n - 1 or (degree >= 2 and degree % 2 == 0 and degree < n - 1)):
        raise ValueError(f"degree {degree!r} is neither n - 1 = {n - 1} nor an even "
                         "integer in [2, n - 1)")


def check_parameters(n: int, degree: int, threshold: int) -> None:
    """``ValueError`` unless ``degree`` and ``threshold`` are resolved values valid for n."""
    _check_degree(n, degree)
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ValueError(f"threshold must be an integer count, got {threshold!r}")
    resolve_threshold(degree, threshold)


def neighbour_graph(cohort: Sequence[int], degree: int,
                    seed: bytes) -> dict[int, tuple[int, ...]]:
    """Each node's neighbours (sorted), the same for everyone given the same public inputs.

    ``cohort`` is taken as a set (its order does not matter); the graph is symmetric.
    """
    nodes = sorted(cohort)
    if len(set(nodes)) != len(nodes):
        raise ValueError("the cohort lists a node twice")
    n = len(nodes)
    _check_degree(n, degree)
    if degree == n - 1:
        return {u: tuple(v for v in nodes if v != u) for u in nodes}
    keys = np.frombuffer(keystream(seed, 8 * n), dtype="<u8")
    ring = [nodes[i] for i in sorted(range(n), key=lambda i: (int(keys[i]), i))]
    graph: dict[int, set[int]] = {u: set() for u in nodes}
    for pos, u in enumerate(ring):
        for step in range(1, degree // 2 + 1):
            v = ring[(pos + step) % n]
            graph[u].add(v)
            graph[v].add(u)
    return {u: tuple(sorted(vs)) for u, vs in graph.items()}
