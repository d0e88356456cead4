"""What the server and the clients of a secure aggregation round share: the round's public
config, the errors, and the byte strings that get signed.

:class:`RoundConfig` is public: the round id, the cohort (node ids), the graph's degree,
the server's nonce ``graph_seed``, the threshold t, the modulus bits k and the vector
length. Every party derives the Shamir x-coordinates (a node's position in the sorted
cohort, plus one) from it; the neighbour graph comes from it and a seed the clients draw
together (:mod:`fedlora.secagg.joint_seed`), never from the server's nonce alone. Every
signature covers the config's digest: a client whose neighbours were sent another config
(another threshold, cohort or degree) sees their signatures fail.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .crypto import KEY_BYTES, ids_bytes
from .graph import check_parameters, choose_parameters
from .masks import MAX_BITS

__all__ = ["ProtocolError", "RoundAborted", "RoundConfig", "SecAggError",
           "consistency_transcript", "keys_transcript"]

CONFIG_LABEL = b"fedlora-secagg/v1/round-config"
KEYS_LABEL = b"fedlora-secagg/v1/advertised-keys"
CONSISTENCY_LABEL = b"fedlora-secagg/v1/consistency"


class SecAggError(Exception):
    """Base class of secure aggregation errors."""


class ProtocolError(SecAggError):
    """A client refuses a stage: the request is malformed, inconsistent or unsafe."""


class RoundAborted(SecAggError):
    """The server cannot finish the round; it released nothing about any input."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; the round released nothing")


@dataclass(frozen=True)
class RoundConfig:
    """The public parameters of one round (see the module docstring)."""

    round_id: int
    cohort: tuple[int, ...]
    degree: int
    threshold: int
    bits: int
    length: int
    graph_seed: bytes  # the server's nonce: the graph's seed is drawn by the clients
    # What the application binds to the round (e.g. a digest of its DP parameters): signed
    # with the rest, so sites given different contexts refuse each other's keys.
    context: bytes = b""

    def __post_init__(self) -> None:
        cohort = tuple(self.cohort)
        object.__setattr__(self, "cohort", tuple(sorted(cohort)))
        ids_bytes(self.round_id, *cohort)
        if len(set(cohort)) != len(cohort):
            raise ValueError("the cohort lists a node twice")
        check_parameters(len(cohort), self.degree, self.threshold)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) \
                or not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {self.bits!r}")
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"length must be a positive integer, got {self.length!r}")
        if not isinstance(self.graph_seed, bytes) or len(self.graph_seed) != KEY_BYTES:
            raise ValueError(f"graph_seed must be {KEY_BYTES} bytes")
        if not isinstance(self.context, bytes) or len(self.context) > 64:
            raise ValueError("context must be at most 64 bytes")

    @classmethod
    def create(cls, round_id: int, cohort: Iterable[int], *, length: int, bits: int,
               degree: int | str | None = None,
               threshold: int | float | None = None, context: bytes = b"") -> RoundConfig:
        """A config with resolved degree and threshold and a server nonce (``graph_seed``)
        from OS entropy; the graph itself comes from the clients' joint seed."""
        cohort = tuple(cohort)
        k, t = choose_parameters(len(cohort), degree, threshold)
        return cls(round_id, cohort, k, t, bits, length, os.urandom(KEY_BYTES), context)

    def to_message(self) -> dict[str, Any]:
        """The config as a plain dict (ints, a list of ints, bytes)."""
        return {"round_id": self.round_id, "cohort": list(self.cohort), "degree": self.degree,
                "threshold": self.threshold, "bits": self.bits, "length": self.length,
                "graph_seed": self.graph_seed, "context": self.context}

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> RoundConfig:
        """Inverse of :meth:`to_message`; ``ValueError`` on a missing or invalid field."""
        try:
            return cls(message["round_id"], tuple(message["cohort"]), message["degree"],
                       message["threshold"], message["bits"], message["length"],
                       message["graph_seed"], message.get("context", b""))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed round config: {exc!r}") from exc

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of the whole config: what signatures bind a round to."""
        fields = ids_bytes(self.round_id, self.degree, self.threshold, self.bits, self.length,
                           len(self.cohort), *self.cohort)
        return hashlib.sha256(CONFIG_LABEL + fields + self.graph_seed
                              + ids_bytes(len(self.context)) + self.context).digest()

    @cached_property
    def _positions(self) -> dict[int, int]:
        return {node: i for i, node in enumerate(self.cohort)}

    def share_x(self, node: int) -> int:
        """The Shamir x-coordinate of the shares ``node`` holds."""
        return self._positions[node] + 1


def keys_transcript(config: RoundConfig, node: int, c_pk: bytes, s_pk: bytes,
                    sig_pk: bytes, seed_commitments: bytes) -> bytes:
    """The bytes a client signs when it advertises its public keys: the config, the digest
    of the graph seed's commitments it was shown, and its keys."""
    return (KEYS_LABEL + config.digest + seed_commitments + ids_bytes(node) + c_pk + s_pk
            + sig_pk)


def consistency_transcript(config: RoundConfig, survivors: Iterable[int], c_pk: bytes,
                           s_pk: bytes) -> bytes:
    """The bytes a client signs in the consistency check: the round, the sorted U3 and the
    signer's own fresh public keys of this run of the round (so a signature made with a
    long-term identity cannot be replayed into another run of the same round config)."""
    ids = sorted(set(survivors))
    return CONSISTENCY_LABEL + config.digest + ids_bytes(len(ids), *ids) + c_pk + s_pk
