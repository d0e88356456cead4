"""A client of secure aggregation: SecAgg+ (Bell et al., CCS 2020) with the consistency
check of SecAgg (Bonawitz et al., CCS 2017).

Goal: the server learns the sum of the integer vectors (mod 2^k) of the clients that
finish the round, and nothing else about any one vector. Threat model: the server and
fewer than t of any client's neighbours may collude and deviate from the protocol (drop,
reorder, alter or forge messages, lie about who dropped); a server that shows clients
different survivor sets needs only c <= 2t - k colluding neighbours (k the degree); clients trust only their own
randomness and the public round config. The neighbour graph's seed is drawn by the clients
together (:mod:`fedlora.secagg.joint_seed`): the server cannot choose the graph. Messages
travel through the server; pairwise encryption
keeps shares from it. Signing keys are fresh per round unless the client is given a
long-term ``identity`` and the others' public identities (``known_identities`` by node id,
or ``trusted``: a set of public identities, any of which a neighbour may sign with, each
at most once), which stops a server from impersonating clients to each other or
inserting parties of its own.

A client ``u`` answers six stages, each a plain dict in and out, in this order:

1. :meth:`SecAggClient.setup`: reads the config, draws its share of the graph seed from
   OS entropy and returns only a commitment to it (:mod:`fedlora.secagg.joint_seed`).
2. :meth:`SecAggClient.advertise`: given the commitments of the clients that committed,
   draws two X25519 key pairs (``c`` for encryption, ``s`` for masks) and an Ed25519
   signing key; returns its seed share and its public keys, signed over the config and
   the commitments it was shown.
3. :meth:`SecAggClient.share_keys`: given every committed client's seed share, derives the
   joint graph seed, hence its neighbours; given their keys (U1), draws a self-mask seed
   b_u and Shamir-shares b_u and its ``s`` secret key among those neighbours (threshold t,
   the client itself holds no share); each neighbour's pair of shares is encrypted under
   the key both derive from their ``c`` keys.
4. :meth:`SecAggClient.masked_input`: given the shares addressed to it and the set U2 of
   clients that shared, returns ``y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv)`` over its
   neighbours v in U2 (+ if u < v, - otherwise), so pairwise masks cancel in a sum.
5. :meth:`SecAggClient.consistency`: given the set U3 of clients whose y_u arrived, signs
   (round, U3).
6. :meth:`SecAggClient.unmask`: given its neighbours' signatures, all over the same U3,
   reveals its share of b_v for neighbours v in U3 and of v's ``s`` key for neighbours in
   U2 but not U3; never both for one v, and only once.

Any stage with fewer than t neighbours left, or a request inconsistent with what the client
has seen or signed, raises :class:`~fedlora.secagg.common.ProtocolError`; a client that
refused once refuses every later stage. A client given a ``floor``
(:class:`~fedlora.secagg.floor.Floor`) also refuses a round whose config, U2 or U3 is
below it, whatever the config says.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import joint_seed
from .common import ProtocolError, RoundConfig, consistency_transcript, keys_transcript
from .crypto import (
    ENCRYPTION_LABEL,
    KEY_BYTES,
    MASK_LABEL,
    CryptoError,
    agree,
    decrypt,
    encrypt,
    new_agreement_key,
    new_signing_key,
    public_bytes,
    secret_bytes,
    sign,
    usable_public_key,
    verify,
)
from .floor import Floor
from .graph import neighbour_graph
from .masks import add, check_vector, prg, subtract
from .shamir import SHARE_BYTES, share_from_bytes, share_to_bytes, split

__all__ = ["SecAggClient"]

STAGES = ("setup", "advertise", "share_keys", "masked_input", "consistency", "unmask", "done")
KEY_FIELDS = ("c_pk", "s_pk", "sig_pk")


def _node_set(values: Any, what: str) -> set[int]:
    try:
        nodes = set(values)
    except TypeError as exc:
        raise ProtocolError(f"{what} is not a list of node ids") from exc
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in nodes):
        raise ProtocolError(f"{what} is not a list of node ids")
    return nodes


def _field(message: Mapping[str, Any], key: str) -> Any:
    if not isinstance(message, Mapping) or key not in message:
        raise ProtocolError(f"the message has no {key!r}")
    return message[key]


class SecAggClient:
    """One client's side of one round; it keeps its secrets to itself."""

    def __init__(self, node_id: int, *, identity: Ed25519PrivateKey | None = None,
                 known_identities: Mapping[int, bytes] | None = None,
                 trusted: frozenset[bytes] | None = None, floor: Floor | None = None) -> None:
        self.node_id = node_id
        self._floor = floor if floor is not None else Floor()
        self._identity = identity
        self._known = dict(known_identities) if known_identities is not None else None
        self._trusted = frozenset(trusted) if trusted is not None else None
        self._stage = "setup"

    def abort(self) -> None:
        """Refuse this stage and every later one (a check outside the protocol failed)."""
        self._stage = "aborted"

    @property
    def trusted(self) -> frozenset[bytes] | None:
        """The public identities this client accepts from neighbours (None: any)."""
        return self._trusted

    @property
    def floor(self) -> Floor:
        """The least cohort and threshold this client accepts."""
        return self._floor

    @property
    def stage(self) -> str:
        """The stage this client answers next (``"aborted"`` once it refused one)."""
        return self._stage

    def _expect(self, stage: str) -> None:
        if self._stage != stage:
            raise ProtocolError(f"node {self.node_id} cannot run {stage!r} now "
                                f"(expected {self._stage!r})")

    def _enter(self, stage: str) -> None:
        self._expect(stage)
        self._stage = "aborted"  # until the stage succeeds

    def _leave(self, stage: str) -> None:
        self._stage = STAGES[STAGES.index(stage) + 1]

    def _enough(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            raise ProtocolError(f"node {self.node_id}: only {count} {what}, "
                                f"threshold is {self.config.threshold}")

    def setup(self, message: Mapping[str, Any]) -> dict[str, bytes]:
        """Stage 1: read the config; return a commitment to this client's share of the
        graph seed."""
        self._enter("setup")
        try:
            self.config = RoundConfig.from_message(message)
        except ValueError as exc:
            raise ProtocolError(f"bad round config: {exc}") from exc
        if self.node_id not in self.config.cohort:
            raise ProtocolError(f"node {self.node_id} is not in the round's cohort")
        self._floor.check_config(self.config)
        self._seed_share = joint_seed.draw()
        self._leave("setup")
        return {"commitment": joint_seed.commitment(self.config, self.node_id,
                                                    self._seed_share)}

    def advertise(self, message: Mapping[str, Any]) -> dict[str, bytes]:
        """Stage 2: keep the commitments of the graph seed; return this client's share of
        it and its public keys, signed over the config and those commitments."""
        self._enter("advertise")
        try:
            commitments = joint_seed.check_commitments(self.config,
                                                       _field(message, "commitments"))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from exc
        own = joint_seed.commitment(self.config, self.node_id, self._seed_share)
        if commitments.get(self.node_id) != own:
            raise ProtocolError(f"the commitments do not hold node {self.node_id}'s own")
        self._floor.check_cohort(len(commitments), "the set of sites that drew the graph")
        self._enough(len(commitments) - 1, "other sites drew the graph seed")
        self._commitments = commitments
        self._seed_binding = joint_seed.commitments_digest(self.config, commitments)
        self._c_sk, self._s_sk = new_agreement_key(), new_agreement_key()
        self._sig_sk = self._identity if self._identity is not None else new_signing_key()
        keys = {"c_pk": public_bytes(self._c_sk), "s_pk": public_bytes(self._s_sk),
                "sig_pk": public_bytes(self._sig_sk)}
        transcript = keys_transcript(self.config, self.node_id, *keys.values(),
                                     self._seed_binding)
        self._leave("advertise")
        return {"seed_share": self._seed_share, **keys,
                "signature": sign(self._sig_sk, transcript)}

    def _check_bundle(self, v: int, bundle: Any) -> dict[str, bytes]:
        keys = {f: _field(bundle, f) for f in (*KEY_FIELDS, "signature")}
        if not all(isinstance(k, bytes) for k in keys.values()) \
                or len(keys["sig_pk"]) != KEY_BYTES \
                or not all(usable_public_key(keys[f]) for f in ("c_pk", "s_pk")):
            raise ProtocolError(f"malformed public keys for node {v}")
        transcript = keys_transcript(self.config, v, *(keys[f] for f in KEY_FIELDS),
                                     self._seed_binding)
        if not verify(keys["sig_pk"], keys["signature"], transcript):
            raise ProtocolError(f"the public keys of node {v} are not validly signed")
        if self._known is not None and self._known.get(v) != keys["sig_pk"]:
            raise ProtocolError(f"node {v}'s signing key is not its known identity")
        if self._trusted is not None and keys["sig_pk"] not in self._trusted:
            raise ProtocolError(f"node {v} signs with an identity this client does not trust")
        return keys

    def share_keys(self, message: Mapping[str, Any]) -> dict[str, dict[int, bytes]]:
        """Stage 3: draw the graph from the joint seed; check the neighbours' keys; return
        encrypted shares of b_u and s_sk_u."""
        self._enter("share_keys")
        try:
            seed = joint_seed.joint_seed(self.config, self._commitments,
                                         _field(message, "seed_shares"))
        except ValueError as exc:
            raise ProtocolError(f"no graph: {exc}") from exc
        committed = set(self._commitments)
        del self._commitments, self._seed_share  # what remains of them is the graph
        graph = neighbour_graph(self.config.cohort, self.config.degree, seed)
        self.neighbours = frozenset(graph[self.node_id])
        bundles = _field(message, "keys")
        if not isinstance(bundles, Mapping):
            raise ProtocolError("'keys' must map node ids to public keys")
        strangers = _node_set(bundles, "'keys'") - (self.neighbours & committed)
        if strangers:
            raise ProtocolError(f"keys of {sorted(strangers)}, not neighbours that drew the "
                                "graph, were sent")
        self._peers = {v: self._check_bundle(v, b) for v, b in bundles.items()}
        own = [public_bytes(self._c_sk), public_bytes(self._s_sk)]
        every = own + [k[f] for k in self._peers.values() for f in ("c_pk", "s_pk")]
        if len(set(every)) != len(every):
            raise ProtocolError("two advertised public keys are equal (replayed keys)")
        signers = [public_bytes(self._sig_sk)] + [k["sig_pk"] for k in self._peers.values()]
        if self._trusted is not None and len(set(signers)) != len(signers):
            raise ProtocolError("two neighbours sign with one identity (a party counted twice)")
        self._enough(len(self._peers), "neighbours advertised keys")
        order = sorted(self._peers)
        xs = [self.config.share_x(v) for v in order]
        t, round_id = self.config.threshold, self.config.round_id
        try:
            self._encryption_keys = {
                v: agree(self._c_sk, self._peers[v]["c_pk"], label=ENCRYPTION_LABEL,
                         round_id=round_id, node=self.node_id, peer=v) for v in order}
            self._mask_seeds = {
                v: agree(self._s_sk, self._peers[v]["s_pk"], label=MASK_LABEL,
                         round_id=round_id, node=self.node_id, peer=v) for v in order}
        except CryptoError as exc:
            raise ProtocolError(str(exc)) from exc
        self._b = os.urandom(KEY_BYTES)
        b_shares = split(self._b, t, xs)
        s_shares = split(secret_bytes(self._s_sk), t, xs)
        ciphertexts = {}
        for v, (_, yb), (_, ys) in zip(order, b_shares, s_shares, strict=True):
            ciphertexts[v] = encrypt(self._encryption_keys[v],
                                     share_to_bytes(yb) + share_to_bytes(ys),
                                     round_id=round_id, sender=self.node_id, receiver=v)
        self._leave("share_keys")
        return {"ciphertexts": ciphertexts}

    def _open(self, v: int, blob: Any) -> tuple[bytes, bytes]:
        plain = decrypt(self._encryption_keys[v], blob, round_id=self.config.round_id, sender=v,
                        receiver=self.node_id)
        if len(plain) != 2 * SHARE_BYTES:
            raise ProtocolError(f"node {v} sent shares of the wrong size")
        b_share, s_share = plain[:SHARE_BYTES], plain[SHARE_BYTES:]
        for share in (b_share, s_share):
            share_from_bytes(share)  # a field element, or ValueError
        return b_share, s_share

    def check_u2(self, message: Mapping[str, Any]) -> set[int]:
        """U2 of a masked-input request, checked without touching the input: it holds this
        node, lies in the cohort and meets the floor (``ProtocolError`` otherwise)."""
        self._expect("masked_input")
        return self._read_u2(message)

    def _read_u2(self, message: Mapping[str, Any]) -> set[int]:
        u2 = _node_set(_field(message, "u2"), "'u2'")
        if self.node_id not in u2:
            raise ProtocolError(f"node {self.node_id} is missing from U2")
        if not u2 <= set(self.config.cohort):
            raise ProtocolError("U2 holds nodes outside the round's cohort")
        self._floor.check_cohort(len(u2), "U2 (the sites that shared their keys)")
        self._check_pinned(u2, "the pinned sites in U2")
        return u2

    def _check_pinned(self, nodes: set[int], what: str) -> None:
        """With pinned identities, the floor on the sites this node verified itself (its
        neighbours in ``nodes`` whose keys a pinned identity signed, and itself): the
        server names the others, and could have made them up."""
        if self._trusted is not None:
            verified = len(nodes & set(getattr(self, "_peers", {}))) + 1
            self._floor.check_cohort(verified, f"{what} (verified here, this site included)")

    def masked_input(self, message: Mapping[str, Any], vector: Any) -> dict[str, np.ndarray]:
        """Stage 4: keep the shares addressed to u; return the masked vector y_u.

        ``vector`` holds ``length`` integers in [0, 2^bits) (``ValueError`` otherwise).
        """
        self._expect("masked_input")
        bits, length = self.config.bits, self.config.length
        x = check_vector(vector, length, bits)
        self._enter("masked_input")
        ciphertexts = _field(message, "ciphertexts")
        self._u2 = self._read_u2(message)
        if not isinstance(ciphertexts, Mapping):
            raise ProtocolError("'ciphertexts' must map node ids to bytes")
        live = self._u2 & self.neighbours
        if not live <= set(self._peers):
            raise ProtocolError("U2 holds neighbours whose keys this node never received")
        if _node_set(ciphertexts, "'ciphertexts'") != live:
            raise ProtocolError("the ciphertexts do not come from exactly the neighbours in U2")
        self._enough(len(live), "neighbours in U2")
        try:
            self._held = {v: self._open(v, ciphertexts[v]) for v in sorted(live)}
        except (CryptoError, ValueError) as exc:
            raise ProtocolError(str(exc)) from exc
        y = add(x, prg(self._b, length, bits), bits)
        del self._b  # only the neighbours' shares can bring it back now
        for v in sorted(live):
            mask = prg(self._mask_seeds[v], length, bits)
            y = (add if self.node_id < v else subtract)(y, mask, bits)
        self._leave("masked_input")
        return {"masked": y}

    def consistency(self, message: Mapping[str, Any]) -> dict[str, bytes]:
        """Stage 5: check U3; return a signature over (round, U3)."""
        self._enter("consistency")
        self._u3 = _node_set(_field(message, "u3"), "'u3'")
        if self.node_id not in self._u3:
            raise ProtocolError(f"node {self.node_id} is missing from U3")
        if not self._u3 <= self._u2:
            raise ProtocolError("U3 holds nodes that are not in U2")
        self._floor.check_cohort(len(self._u3), "U3 (the sites whose masked input arrived)")
        self._check_pinned(self._u3, "the pinned sites in U3")
        self._enough(len(self._u3 & self.neighbours), "neighbours in U3")
        transcript = consistency_transcript(self.config, self._u3, public_bytes(self._c_sk),
                                            public_bytes(self._s_sk))
        self._leave("consistency")
        return {"signature": sign(self._sig_sk, transcript)}

    def unmask(self, message: Mapping[str, Any]) -> dict[str, dict[int, bytes]]:
        """Stage 6: check the neighbours' signatures on U3; return the requested shares."""
        self._enter("unmask")
        signatures = _field(message, "signatures")
        if not isinstance(signatures, Mapping):
            raise ProtocolError("'signatures' must map node ids to bytes")
        live = self._u3 & self.neighbours
        for v in _node_set(signatures, "'signatures'"):
            if v not in live:
                raise ProtocolError(f"a signature from node {v}, not a neighbour in U3")
            keys = self._peers[v]
            transcript = consistency_transcript(self.config, self._u3, keys["c_pk"],
                                                keys["s_pk"])
            if not verify(keys["sig_pk"], signatures[v], transcript):
                raise ProtocolError(f"node {v} did not sign the U3 this node signed "
                                    "(the server may be showing clients different sets)")
        self._enough(len(signatures), "valid consistency signatures")
        self._check_pinned(set(signatures), "the pinned neighbours that signed U3")
        b_for = _node_set(_field(message, "b_shares_for"), "'b_shares_for'")
        sk_for = _node_set(_field(message, "sk_shares_for"), "'sk_shares_for'")
        if not b_for <= live:
            raise ProtocolError(f"self-mask shares asked for {sorted(b_for - live)}, "
                                "which are not neighbours in the signed U3")
        dropped = (self._u2 - self._u3) & self.neighbours
        if not sk_for <= dropped:
            raise ProtocolError(f"mask-key shares asked for {sorted(sk_for - dropped)}, which "
                                "are not neighbours that dropped out of the signed U3")
        self._leave("unmask")
        return {"b_shares": {v: self._held[v][0] for v in sorted(b_for)},
                "sk_shares": {v: self._held[v][1] for v in sorted(sk_for)}}
