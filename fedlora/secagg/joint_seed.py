"""The seed of a round's neighbour graph, drawn by the clients together: no one chooses it.

A server that chose the graph seed could try seeds offline until the graph surrounds one
client with parties it plays, then unmask that client's input. The seed is therefore a
hash of contributions the cohort commits to before any is revealed (commit, then reveal):

1. at setup each client ``u`` draws 32 bytes ``r_u`` from OS entropy and sends only the
   commitment ``c_u = SHA-256(label, config digest, u, r_u)`` (:func:`commitment`);
2. it is then sent the commitments of the set S of clients that committed; it keeps them,
   reveals ``r_u``, and signs its public keys over the round config *and* the digest of
   S's commitments (:func:`commitments_digest`);
3. it is then sent every ``r_v`` of S, checks each against ``c_v`` and derives the seed as
   the hash of the commitments' digest and all the reveals (:func:`joint_seed`).

The server sees every commitment before the reveals, but a commitment hides ``r_u``, and
once a client has revealed, no commitment (the server's parties' included) can change:
a single honest client's fresh ``r_u`` makes the seed uniform to everyone else. Leaving a
reveal out is not allowed (the seed needs all of S), or the server could choose among the
seeds its parties' reveals make; a client of S that does not reveal ends the round, which
then releases nothing. Showing clients different sets S gives them different digests:
their key signatures then fail for each other and they refuse the round. The config's own
``graph_seed`` (the server's) is part of the config digest and decides nothing alone.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

from .common import RoundConfig
from .crypto import KEY_BYTES, ids_bytes

__all__ = ["check_commitments", "commitment", "commitments_digest", "draw", "joint_seed"]

COMMIT_LABEL = b"fedlora-secagg/v1/graph-seed-commitment"
SET_LABEL = b"fedlora-secagg/v1/graph-seed-commitments"
SEED_LABEL = b"fedlora-secagg/v1/graph-seed"


def draw() -> bytes:
    """A client's contribution: 32 bytes of OS entropy."""
    return os.urandom(KEY_BYTES)


def commitment(config: RoundConfig, node: int, contribution: bytes) -> bytes:
    """``node``'s commitment to ``contribution`` in the round of ``config``."""
    return hashlib.sha256(COMMIT_LABEL + config.digest + ids_bytes(node)
                          + contribution).digest()


def check_commitments(config: RoundConfig, commitments: Any) -> dict[int, bytes]:
    """``commitments`` as a dict of cohort node ids to 32-byte strings (``ValueError``
    naming what is wrong otherwise)."""
    if not isinstance(commitments, Mapping):
        raise ValueError("the commitments must map node ids to bytes")
    out = {}
    cohort = set(config.cohort)
    for node, value in commitments.items():
        if isinstance(node, bool) or not isinstance(node, int) or node not in cohort:
            raise ValueError(f"a commitment from {node!r}, not a node of the round's cohort")
        if not isinstance(value, bytes) or len(value) != KEY_BYTES:
            raise ValueError(f"node {node}'s commitment is not {KEY_BYTES} bytes")
        out[node] = value
    return out


def commitments_digest(config: RoundConfig, commitments: Mapping[int, bytes]) -> bytes:
    """SHA-256 of the round and the set of commitments (sorted by node): what each client
    signs with its keys, so that clients shown different sets refuse each other."""
    nodes = sorted(commitments)
    return hashlib.sha256(SET_LABEL + config.digest + ids_bytes(len(nodes), *nodes)
                          + b"".join(commitments[v] for v in nodes)).digest()


def joint_seed(config: RoundConfig, commitments: Mapping[int, bytes],
               reveals: Any) -> bytes:
    """The graph seed from every committed client's reveal (``ValueError`` naming the node
    whose reveal is missing, extra or does not open its commitment)."""
    if not isinstance(reveals, Mapping):
        raise ValueError("the reveals must map node ids to bytes")
    missing = sorted(set(commitments) - set(reveals))
    extra = sorted(set(reveals) - set(commitments), key=repr)
    if missing or extra:
        raise ValueError(f"the reveals do not match the commitments (missing {missing}, "
                         f"not committed {extra}): the graph seed needs every one")
    nodes = sorted(commitments)
    for v in nodes:
        r = reveals[v]
        if not isinstance(r, bytes) or len(r) != KEY_BYTES \
                or commitment(config, v, r) != commitments[v]:
            raise ValueError(f"node {v}'s reveal does not open its commitment")
    return hashlib.sha256(SEED_LABEL + commitments_digest(config, commitments)
                          + b"".join(reveals[v] for v in nodes)).digest()
