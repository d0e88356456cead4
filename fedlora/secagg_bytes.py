"""The bytes of every secure aggregation message, predicted from the round's public
parameters: what the communication log sets against what it measures.

A stage's message is one flat record (:func:`fedlora.secagg.state.flatten`) plus, in the
masked-input reply, the masked vector (:func:`fedlora.secure_sum.to_records`);
:func:`fedlora.secure_sum.protocol_bytes` counts every key and byte string as written, 8
bytes per integer and the masked vector's raw bytes. Every node id takes a fixed room (17
characters in a key, 8 bytes in a list), so each message's size is a sum of fixed terms
times how many neighbours or sites it names, with ``c`` the bytes of the round's context
(0, or a distributed DP digest), ``m`` the site's neighbours among those still in the
round, ``n`` the sites in the set a message lists:

============  ==================================  =====================================
stage         down (server to site)               up (site to server)
============  ==================================  =====================================
setup         the round config: 132 + 8 n + c     a commitment to its share of the
                                                  graph seed: 42
advertise     the commitments: 24 + 61 j          its share of the seed and its signed
                                                  public keys: 225
share_keys    every share of the seed, its        a pair of encrypted shares each:
              neighbours' keys:                   24 + 189 m
              41 + 61 j + 310 m
masked_input  their shares for it, U2:            the masked vector: L x the bytes of
              30 + 189 m + 8 n                    the smallest unsigned dtype of k bits
consistency   U3: 6 + 8 n                         its signature: 73
unmask        its neighbours' signatures, which   the shares asked for: 43 + 92 (b + d)
              shares to reveal:
              56 + 92 s + 8 (b + d)
============  ==================================  =====================================

with ``j`` the sites that committed to a share of the graph seed (a commitment and a
share are 32 bytes each, :mod:`fedlora.secagg.joint_seed`), ``s`` the neighbours that
signed U3, ``b`` the neighbours in U3 (a share of their self-mask seed each) and ``d``
those that dropped after sharing their keys (a share of their mask key each).

:func:`round_bytes` gives a site's bytes of each stage in a round where no site drops out:
they follow from the cohort size (every site commits, ``j = n``), the degree (neighbours
per site), the vector length and the modulus bits; the threshold changes none (a Shamir
share has one size whatever it is).
:func:`expected_bytes` gives the bytes of one message of a round in progress from the
server's view of who is still in it (:class:`fedlora.secagg.SecAggServer`), dropouts
included.
"""

from __future__ import annotations

from collections.abc import Iterable

from .secagg import SecAggServer
from .secagg.crypto import ID_BYTES, KEY_BYTES, NONCE_BYTES
from .secagg.shamir import SHARE_BYTES
from .secure_sum import transport_dtype

__all__ = ["STAGES", "expected_bytes", "round_bytes"]

STAGES = ("setup", "advertise", "share_keys", "masked_input", "consistency", "unmask")
INT_BYTES = 8  # an integer of a flat record, as counted
SIGNATURE_BYTES = 64  # Ed25519
TAG_BYTES = 16  # ChaCha20-Poly1305
SEED_BYTES = KEY_BYTES  # a commitment (SHA-256) to a share of the graph seed, or the share
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES  # a neighbour's pair of shares
_ID = "#" + "0" * (2 * ID_BYTES)  # a node id as a key segment: every one is this long
_CONFIG = (("round_id", INT_BYTES), ("degree", INT_BYTES), ("threshold", INT_BYTES),
           ("bits", INT_BYTES), ("length", INT_BYTES), ("graph_seed", KEY_BYTES))
_KEYS = (("c_pk", KEY_BYTES), ("s_pk", KEY_BYTES), ("sig_pk", KEY_BYTES),
         ("signature", SIGNATURE_BYTES))


def _leaf(path: str, size: int) -> int:
    return len(path) + size


def _marker(path: str) -> int:
    """A dict's ``@dict`` marker (an integer)."""
    return _leaf(path + "@dict", INT_BYTES)


def _ids(path: str, count: int) -> int:
    """A list of ``count`` node ids."""
    return _leaf(path + "@ids", ID_BYTES * count)


def _per_id(path: str, fields: Iterable[tuple[str, int]]) -> int:
    """One entry of a dict keyed by node id: its marker and its fields."""
    entry = f"{path}/{_ID}"
    return _marker(entry) + sum(_leaf(f"{entry}/{name}", size) for name, size in fields)


def setup_down(cohort: int, context: int) -> int:
    return (sum(_leaf(name, size) for name, size in _CONFIG) + _ids("cohort", cohort)
            + _leaf("context", context))


def _by_site(path: str, count: int) -> int:
    """A dict of ``count`` node ids to ``SEED_BYTES`` each (commitments or seed shares)."""
    return _marker(path) + count * _leaf(f"{path}/{_ID}", SEED_BYTES)


def setup_up() -> int:
    return _leaf("commitment", SEED_BYTES)


def advertise_down(committed: int) -> int:
    return _by_site("commitments", committed)


def advertise_up() -> int:
    return _leaf("seed_share", SEED_BYTES) + sum(_leaf(name, size) for name, size in _KEYS)


def share_keys_down(neighbours: int, committed: int) -> int:
    return (_by_site("seed_shares", committed) + _marker("keys")
            + neighbours * _per_id("keys", _KEYS))


def share_keys_up(neighbours: int) -> int:
    return _marker("ciphertexts") + neighbours * _leaf(f"ciphertexts/{_ID}", CIPHERTEXT_BYTES)


def masked_input_down(neighbours: int, u2: int) -> int:
    return share_keys_up(neighbours) + _ids("u2", u2)


def masked_input_up(length: int, bits: int) -> int:
    return length * transport_dtype(bits).itemsize


def consistency_down(u3: int) -> int:
    return _ids("u3", u3)


def consistency_up() -> int:
    return _leaf("signature", SIGNATURE_BYTES)


def unmask_down(signers: int, b_for: int, sk_for: int) -> int:
    return (_marker("signatures") + signers * _leaf(f"signatures/{_ID}", SIGNATURE_BYTES)
            + _ids("b_shares_for", b_for) + _ids("sk_shares_for", sk_for))


def unmask_up(b_for: int, sk_for: int) -> int:
    return (_marker("b_shares") + b_for * _leaf(f"b_shares/{_ID}", SHARE_BYTES)
            + _marker("sk_shares") + sk_for * _leaf(f"sk_shares/{_ID}", SHARE_BYTES))


def round_bytes(cohort: int, degree: int, length: int, bits: int,
                context: int = 0) -> dict[str, dict[str, int]]:
    """A site's bytes per stage and direction (``{"setup": {"down": .., "up": ..}, ..}``)
    in a round of ``cohort`` sites, ``degree`` neighbours each, that none leaves."""
    k = degree
    return {"setup": {"down": setup_down(cohort, context), "up": setup_up()},
            "advertise": {"down": advertise_down(cohort), "up": advertise_up()},
            "share_keys": {"down": share_keys_down(k, cohort), "up": share_keys_up(k)},
            "masked_input": {"down": masked_input_down(k, cohort),
                             "up": masked_input_up(length, bits)},
            "consistency": {"down": consistency_down(cohort), "up": consistency_up()},
            "unmask": {"down": unmask_down(k, k, 0), "up": unmask_up(k, 0)}}


def _near(server: SecAggServer, node: int, among: set[int]) -> int:
    return sum(v in among for v in server.graph[node])


def expected_bytes(server: SecAggServer, stage: str, direction: str, node: int) -> int:
    """The bytes of ``stage``'s message to (``down``) or from (``up``) ``node``, as the
    protocol's state at ``server`` after the previous stage implies (a reply: the one a
    site that follows the protocol sends)."""
    cfg = server.config
    if stage == "setup":
        return setup_down(len(cfg.cohort), len(cfg.context)) if direction == "down" \
            else setup_up()
    if stage == "advertise":
        return advertise_down(len(server.commitments)) if direction == "down" \
            else advertise_up()
    if stage == "share_keys":
        m = _near(server, node, server.u1)
        return share_keys_down(m, len(server.commitments)) if direction == "down" \
            else share_keys_up(m)
    if stage == "masked_input":
        return masked_input_down(_near(server, node, server.u2), len(server.u2)) \
            if direction == "down" else masked_input_up(cfg.length, cfg.bits)
    if stage == "consistency":
        return consistency_down(len(server.u3)) if direction == "down" else consistency_up()
    if stage == "unmask":
        asked = server.requests[node]
        b_for, sk_for = len(asked["b_shares_for"]), len(asked["sk_shares_for"])
        return unmask_down(_near(server, node, server.u4), b_for, sk_for) \
            if direction == "down" else unmask_up(b_for, sk_for)
    raise ValueError(f"unknown secure aggregation stage {stage!r} (known: {', '.join(STAGES)})")
