"""The server of secure aggregation (see :mod:`fedlora.secagg.client` for the protocol and
the threat model).

The server does not choose the neighbour graph: it learns it, as the clients do, from the
seed they draw together (:mod:`fedlora.secagg.joint_seed`) once every client that
committed to a share of it has revealed it.

The server only routes messages and, at the end, removes the masks it is able to remove:
the self masks of the clients in U3 (from t shares of each b_u) and the pairwise masks
between each client that dropped after sharing (in U2, not in U3) and its neighbours in U3
(from t shares of the dropped client's ``s`` key). What is left is the sum of the inputs of
U3 modulo 2^k. It holds nothing but what clients sent it. At each stage it proceeds with
whoever answered with a well-formed reply (a client that does not answer has dropped
out); when too few remain it raises :class:`~fedlora.secagg.common.RoundAborted` before
reconstructing anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import joint_seed
from .common import RoundAborted, RoundConfig, consistency_transcript, keys_transcript
from .crypto import KEY_BYTES, MASK_LABEL, agree, public_bytes, usable_public_key, verify
from .graph import neighbour_graph
from .masks import add, check_vector, decode, prg, subtract, zeros
from .shamir import combine, share_from_bytes

__all__ = ["Aggregate", "SecAggServer"]

KEY_FIELDS = ("c_pk", "s_pk", "sig_pk")


@dataclass(frozen=True, eq=False)
class Aggregate:
    """The round's result: ``total`` is the sum mod 2^bits of the inputs of ``survivors``."""

    total: np.ndarray
    survivors: tuple[int, ...]
    bits: int

    def signed(self) -> np.ndarray:
        """The total read as a signed sum (centred lift, see :func:`~.masks.decode`)."""
        return decode(self.total, self.bits)


def _get(reply: Any, key: str) -> Any:
    return reply.get(key) if isinstance(reply, Mapping) else None


class SecAggServer:
    """The server's side of one round, driven by the clients' replies to each stage."""

    def __init__(self, config: RoundConfig) -> None:
        self.config = config
        self._stage = "setup"

    def _enter(self, stage: str, following: str) -> None:
        if self._stage != stage:
            raise RuntimeError(f"the server cannot run {stage!r} now (expected {self._stage!r})")
        self._stage = following

    def _require(self, nodes: set[int], what: str, minimum: int) -> None:
        if len(nodes) < minimum:
            self._stage = "aborted"
            raise RoundAborted(f"only {len(nodes)} clients {what}, at least {minimum} needed")

    def _near(self, node: int, among: set[int]) -> list[int]:
        return [v for v in self.graph[node] if v in among]

    def setup(self) -> dict[int, dict[str, Any]]:
        """Stage 1 messages: the round config, to every client of the cohort."""
        self._enter("setup", "commitments")
        return {u: self.config.to_message() for u in self.config.cohort}

    def collect_commitments(self, replies: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        """Stage 2 messages: each client that committed to its share of the graph seed gets
        every such commitment."""
        self._enter("commitments", "keys")
        self.commitments = {u: _get(r, "commitment") for u, r in replies.items()
                            if u in self.config.cohort
                            and isinstance(_get(r, "commitment"), bytes)
                            and len(_get(r, "commitment")) == KEY_BYTES}
        self._require(set(self.commitments), "committed to the graph seed",
                      self.config.threshold + 1)
        return {u: {"commitments": dict(self.commitments)} for u in sorted(self.commitments)}

    def _valid_keys(self, u: int, reply: Any) -> bool:
        keys = [_get(reply, f) for f in KEY_FIELDS]
        if not (usable_public_key(keys[0]) and usable_public_key(keys[1])
                and isinstance(keys[2], bytes) and len(keys[2]) == KEY_BYTES):
            return False
        return verify(keys[2], _get(reply, "signature"),
                      keys_transcript(self.config, u, *keys, self.seed_binding))

    def collect_keys(self, replies: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        """Stage 3 messages: every client of U1 gets every seed share (the graph is theirs
        to draw) and its neighbours' signed public keys. A committed client that does not
        reveal its share leaves no graph: the round aborts."""
        self._enter("keys", "shares")
        shares = {u: _get(r, "seed_share") for u, r in replies.items()
                  if u in self.commitments}
        try:
            seed = joint_seed.joint_seed(self.config, self.commitments, shares)
        except ValueError as exc:
            self._stage = "aborted"
            raise RoundAborted(f"no neighbour graph ({exc})") from exc
        self.seed_binding = joint_seed.commitments_digest(self.config, self.commitments)
        self.graph = neighbour_graph(self.config.cohort, self.config.degree, seed)
        self.keys = {u: {f: r[f] for f in (*KEY_FIELDS, "signature")}
                     for u, r in replies.items()
                     if u in self.commitments and self._valid_keys(u, r)}
        self.u1 = set(self.keys)
        self._require(self.u1, "advertised keys", self.config.threshold + 1)
        return {u: {"seed_shares": dict(shares),
                    "keys": {v: self.keys[v] for v in self._near(u, self.u1)}}
                for u in sorted(self.u1)}

    def collect_shares(self, replies: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        """Stage 4 messages: each client of U2 gets the ciphertexts addressed to it, and U2."""
        self._enter("shares", "masked")
        ciphertexts = {}
        for v, reply in replies.items():
            cts = _get(reply, "ciphertexts")
            if v in self.u1 and isinstance(cts, Mapping) \
                    and set(cts) == set(self._near(v, self.u1)) \
                    and all(isinstance(c, bytes) for c in cts.values()):
                ciphertexts[v] = cts
        self.u2 = set(ciphertexts)
        self._require(self.u2, "shared their keys", self.config.threshold + 1)
        return {u: {"ciphertexts": {v: ciphertexts[v][u] for v in self._near(u, self.u2)},
                    "u2": sorted(self.u2)} for u in sorted(self.u2)}

    def collect_masked(self, replies: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        """Stage 5 messages: each client of U3 (whose masked vector arrived) gets U3."""
        self._enter("masked", "signatures")
        self.masked = {}
        for u, reply in replies.items():
            if u in self.u2:
                try:
                    self.masked[u] = check_vector(_get(reply, "masked"), self.config.length,
                                                  self.config.bits)
                except ValueError:
                    continue
        self.u3 = set(self.masked)
        self._require(self.u3, "sent a masked input", self.config.threshold + 1)
        return {u: {"u3": sorted(self.u3)} for u in sorted(self.u3)}

    def collect_signatures(self, replies: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        """Stage 6 messages: neighbours' signatures on U3 and which shares to reveal."""
        self._enter("signatures", "unmask")
        self.signatures = {u: _get(r, "signature") for u, r in replies.items()
                           if u in self.u3 and verify(
                               self.keys[u]["sig_pk"], _get(r, "signature"),
                               consistency_transcript(self.config, self.u3,
                                                      self.keys[u]["c_pk"],
                                                      self.keys[u]["s_pk"]))}
        self.u4 = set(self.signatures)
        self._require(self.u4, "signed U3", self.config.threshold)
        dropped = self.u2 - self.u3
        self.requests = {u: {"b_shares_for": self._near(u, self.u3),
                             "sk_shares_for": self._near(u, dropped)} for u in self.u4}
        return {u: {"signatures": {v: self.signatures[v] for v in self._near(u, self.u4)},
                    **self.requests[u]} for u in sorted(self.u4)}

    def _collect(self, replies: Mapping[int, Any]) -> tuple[dict, dict]:
        b_shares: dict[int, list] = {u: [] for u in self.u3}
        sk_shares: dict[int, list] = {v: [] for v in self.u2 - self.u3}
        for w, reply in replies.items():
            if w not in self.u4:
                continue
            b, sk = _get(reply, "b_shares"), _get(reply, "sk_shares")
            request = self.requests[w]
            if not (isinstance(b, Mapping) and isinstance(sk, Mapping)
                    and set(b) == set(request["b_shares_for"])
                    and set(sk) == set(request["sk_shares_for"])):
                continue
            try:
                parsed = ({u: share_from_bytes(s) for u, s in b.items()},
                          {v: share_from_bytes(s) for v, s in sk.items()})
            except ValueError:
                continue
            x = self.config.share_x(w)
            for target, shares in zip((b_shares, sk_shares), parsed, strict=True):
                for u, y in shares.items():
                    target[u].append((x, y))
        return b_shares, sk_shares

    def _reconstruct(self, shares: list, what: str) -> bytes:
        t = self.config.threshold
        if len(shares) < t:
            self._stage = "aborted"
            raise RoundAborted(f"only {len(shares)} shares of {what}, {t} needed")
        try:
            return combine(shares, t)
        except ValueError as exc:
            self._stage = "aborted"
            raise RoundAborted(f"the shares of {what} do not agree ({exc})") from exc

    def aggregate(self, replies: Mapping[int, Any]) -> Aggregate:
        """The sum mod 2^k of the inputs of U3, from the clients' revealed shares."""
        self._enter("unmask", "done")
        cfg = self.config
        b_shares, sk_shares = self._collect(replies)
        self._require({w for w in replies if w in self.u4}, "revealed shares", cfg.threshold)
        seeds = {u: self._reconstruct(b_shares[u], f"node {u}'s self-mask seed")
                 for u in sorted(self.u3)}
        keys = {}
        for v in sorted(self.u2 - self.u3):
            if not self._near(v, self.u3):
                continue  # no survivor masked with v
            key = X25519PrivateKey.from_private_bytes(
                self._reconstruct(sk_shares[v], f"node {v}'s mask key"))
            if public_bytes(key) != self.keys[v]["s_pk"]:
                self._stage = "aborted"
                raise RoundAborted(f"node {v}'s reconstructed mask key does not match its "
                                   "public key")
            keys[v] = key
        total = zeros(cfg.length)
        for u in sorted(self.u3):
            total = add(total, subtract(self.masked[u], prg(seeds[u], cfg.length, cfg.bits),
                                        cfg.bits), cfg.bits)
        for v, key in keys.items():
            for u in self._near(v, self.u3):
                seed = agree(key, self.keys[u]["s_pk"], label=MASK_LABEL,
                             round_id=cfg.round_id, node=v, peer=u)
                # u added +PRG(s_uv) when u < v and -PRG(s_uv) otherwise: take it back
                total = (subtract if u < v else add)(total, prg(seed, cfg.length, cfg.bits),
                                                     cfg.bits)
        return Aggregate(total, tuple(sorted(self.u3)), cfg.bits)
