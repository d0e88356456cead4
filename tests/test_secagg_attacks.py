"""Secure aggregation against a dishonest server: what a client refuses, and what a masked
vector reveals (fedlora.secagg.client)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlora.secagg import (
    ProtocolError,
    RoundAborted,
    RoundConfig,
    SecAggClient,
    SecAggServer,
    joint_seed,
    run_local_round,
)
from fedlora.secagg.common import keys_transcript
from fedlora.secagg.crypto import new_agreement_key, public_bytes, sign
from fedlora.secagg.shamir import combine, share_from_bytes

CHI2_15 = 50.5  # chi-square critical value, 15 degrees of freedom, p = 1e-6


class Steps:
    """A round driven stage by stage, so that a test can alter the server's messages."""

    def __init__(self, config: RoundConfig, inputs: dict, clients: dict | None = None):
        self.config, self.inputs = config, inputs
        self.server = SecAggServer(config)
        self.clients = clients or {u: SecAggClient(u) for u in config.cohort}

    def ask(self, stage: str, messages: dict, skip=()) -> dict:
        out = {}
        for u, message in messages.items():
            if u not in skip:
                method = getattr(self.clients[u], stage)
                out[u] = (method(message, self.inputs[u]) if stage == "masked_input"
                          else method(message))
        return out

    def until_keys(self) -> dict:
        """Stages 1-2 (the graph seed drawn, the keys advertised); returns the server's
        key-sharing messages."""
        messages = self.server.collect_commitments(self.ask("setup", self.server.setup()))
        return self.server.collect_keys(self.ask("advertise", messages))

    def until_masked(self, skip=()) -> dict:
        """Stages 1-4; returns the server's consistency-check messages."""
        messages = self.server.collect_shares(self.ask("share_keys", self.until_keys()))
        return self.server.collect_masked(self.ask("masked_input", messages, skip))

    def until_unmask(self, skip=()) -> dict:
        return self.server.collect_signatures(self.ask("consistency", self.until_masked(skip)))


def small_round(n: int = 8, bits: int = 20, length: int = 200, degree="all", round_id=1):
    cohort = list(range(1, n + 1))
    config = RoundConfig.create(round_id, cohort, length=length, bits=bits, degree=degree)
    inputs = {u: np.full(length, u, dtype=np.uint64) for u in cohort}
    return config, inputs


def chi_square_top_bits(values: np.ndarray, bits: int) -> float:
    counts = np.bincount((values >> np.uint64(bits - 4)).astype(np.int64), minlength=16)
    expected = values.size / 16
    return float(((counts - expected) ** 2 / expected).sum())


def test_masked_vector_looks_uniform_whatever_the_input():
    bits, length = 16, 50_000
    config = RoundConfig.create(1, [1, 2, 3], length=length, bits=bits)
    for value in (0, 2**bits - 1):
        inputs = {u: np.full(length, value, dtype=np.uint64) for u in config.cohort}
        steps = Steps(config, inputs)
        steps.until_masked()
        y = steps.server.masked[1]
        assert chi_square_top_bits(y, bits) < CHI2_15
        assert np.mean(y == value) < 0.01


def test_same_config_and_input_give_fresh_masks_and_keys():
    """Nothing secret comes from the public config or from seeded global generators."""
    config, inputs = small_round()
    seen = []
    for _ in range(2):
        random.seed(0)
        np.random.seed(0)
        steps = Steps(config, inputs)  # a fresh server and fresh clients, the same config
        replies = steps.ask("unmask", steps.until_unmask())
        shares = [(config.share_x(w), share_from_bytes(r["b_shares"][1]))
                  for w, r in replies.items() if 1 in r["b_shares"]]
        self_mask_seed = combine(shares, config.threshold)
        keys = steps.server.keys[1]
        seen.append((keys["c_pk"], keys["s_pk"], self_mask_seed, steps.server.masked[1]))
    (c1, s1, b1, y1), (c2, s2, b2, y2) = seen
    assert c1 != c2 and s1 != s2
    assert b1 != b2 and config.graph_seed not in (b1, b2)
    assert np.mean(y1 == y2) < 0.01


def test_asking_for_both_secrets_of_one_client_is_refused():
    config, inputs = small_round()
    steps = Steps(config, inputs)
    messages = steps.until_unmask(skip={5})  # 5 dropped: its key shares are due
    assert messages[1]["sk_shares_for"] == [5]
    greedy = {**messages[1], "sk_shares_for": [3, 5]}  # 3 is in U3: its b shares are due
    with pytest.raises(ProtocolError, match="mask-key shares"):
        steps.clients[1].unmask(greedy)
    with pytest.raises(ProtocolError, match="self-mask shares"):
        steps.clients[2].unmask({**messages[2], "b_shares_for": [3, 5]})
    with pytest.raises(ProtocolError):  # a client that refused stays out
        steps.clients[1].unmask(messages[1])
    reply = steps.clients[3].unmask(messages[3])
    assert set(reply["b_shares"]) == set(config.cohort) - {3, 5} and set(reply["sk_shares"]) == {5}
    with pytest.raises(ProtocolError):  # and answers only once
        steps.clients[3].unmask({**messages[3], "b_shares_for": [], "sk_shares_for": [4]})


def test_equivocation_on_u3_gets_no_shares():
    config, inputs = small_round(10)  # complete graph, threshold 6
    steps = Steps(config, inputs)
    messages = steps.until_masked()
    everyone = messages[1]["u3"]
    target = 10
    group_a = [1, 2, 3, 4, 5]  # told that the target dropped: they would reveal its key
    told = {u: ({"u3": [v for v in everyone if v != target]} if u in group_a else m)
            for u, m in messages.items()}
    signatures = {u: r["signature"] for u, r in steps.ask("consistency", told).items()}
    for u in config.cohort:
        same_side = {v: s for v, s in signatures.items()
                     if v != u and (v in group_a) == (u in group_a)}
        if u % 2:  # shown every signature: some are over the other U3
            shown, error = {v: s for v, s in signatures.items() if v != u}, "did not sign"
        else:  # shown only the matching ones: too few (t > k/2 splits cannot both reach t)
            shown, error = same_side, "only 4 valid consistency signatures"
        with pytest.raises(ProtocolError, match=error):
            steps.clients[u].unmask({"signatures": shown, "b_shares_for": [],
                                     "sk_shares_for": [target] if u in group_a else []})


def test_forged_or_moved_ciphertexts_are_rejected():
    config, inputs = small_round()
    steps = Steps(config, inputs)
    messages = steps.server.collect_shares(steps.ask("share_keys", steps.until_keys()))
    to_one = messages[1]["ciphertexts"]
    flipped = bytearray(to_one[2])
    flipped[20] ^= 1
    with pytest.raises(ProtocolError, match="authenticate"):
        steps.clients[1].masked_input({**messages[1], "ciphertexts": {**to_one, 2: bytes(flipped)}},
                                      inputs[1])
    swapped = {**messages[3]["ciphertexts"]}
    swapped[2], swapped[4] = swapped[4], swapped[2]
    with pytest.raises(ProtocolError, match="authenticate"):
        steps.clients[3].masked_input({**messages[3], "ciphertexts": swapped}, inputs[3])
    moved = {**messages[5]["ciphertexts"], 2: messages[6]["ciphertexts"][2]}
    with pytest.raises(ProtocolError, match="authenticate"):
        steps.clients[5].masked_input({**messages[5], "ciphertexts": moved}, inputs[5])
    missing = {v: c for v, c in messages[7]["ciphertexts"].items() if v != 2}
    with pytest.raises(ProtocolError, match="exactly"):
        steps.clients[7].masked_input({**messages[7], "ciphertexts": missing}, inputs[7])


def test_bad_key_bundles_are_refused():
    config, inputs = small_round()
    steps = Steps(config, inputs)
    messages = steps.until_keys()
    keys = messages[1]["keys"]
    replayed = {**keys, 2: {**keys[3]}}  # node 3's signed keys presented as node 2's
    with pytest.raises(ProtocolError, match="not validly signed"):
        steps.clients[1].share_keys({**messages[1], "keys": replayed})
    echo = steps.server.keys[2]  # node 2's own keys sent back to it, re-signed
    fake = Ed25519PrivateKey.generate()
    own = {"c_pk": echo["c_pk"], "s_pk": echo["s_pk"], "sig_pk": public_bytes(fake)}
    own["signature"] = sign(fake, keys_transcript(config, 4, *own.values(),
                                                  steps.server.seed_binding))
    with pytest.raises(ProtocolError, match="replayed"):
        steps.clients[2].share_keys({**messages[2], "keys": {**messages[2]["keys"], 4: own}})


def test_known_identities_stop_impersonation():
    config, inputs = small_round(6)
    identities = {u: Ed25519PrivateKey.generate() for u in config.cohort}
    known = {u: public_bytes(k) for u, k in identities.items()}
    clients = {u: SecAggClient(u, identity=identities[u], known_identities=known)
               for u in config.cohort}
    steps = Steps(config, inputs, clients)
    messages = steps.until_keys()
    impostor = Ed25519PrivateKey.generate()  # the server poses as node 2 to node 1
    fake = {"c_pk": public_bytes(new_agreement_key()), "s_pk": messages[1]["keys"][2]["s_pk"],
            "sig_pk": public_bytes(impostor)}
    fake["signature"] = sign(impostor, keys_transcript(config, 2, *fake.values(),
                                                       steps.server.seed_binding))
    with pytest.raises(ProtocolError, match="known identity"):
        clients[1].share_keys({**messages[1], "keys": {**messages[1]["keys"], 2: fake}})
    result = run_local_round(config, inputs, clients={
        u: SecAggClient(u, identity=identities[u], known_identities=known)
        for u in config.cohort})
    assert np.array_equal(result.total, sum(inputs.values()))


def test_lies_about_u2_or_u3_are_refused():
    config, inputs = small_round()
    steps = Steps(config, inputs)
    messages = steps.until_masked()
    with pytest.raises(ProtocolError, match="missing from U3"):
        steps.clients[1].consistency({"u3": [v for v in messages[1]["u3"] if v != 1]})
    with pytest.raises(ProtocolError, match="not in U2"):
        steps.clients[2].consistency({"u3": messages[2]["u3"] + [99]})
    with pytest.raises(ProtocolError, match="neighbours in U3"):
        steps.clients[3].consistency({"u3": [3, 4]})
    with pytest.raises(ProtocolError, match="cannot run"):
        steps.clients[4].masked_input({}, inputs[4])  # stages run in order, once


def test_a_client_outside_the_cohort_refuses_and_a_tampered_round_aborts():
    config, inputs = small_round()
    with pytest.raises(ProtocolError, match="not in the round's cohort"):
        SecAggClient(99).setup(config.to_message())

    def equivocate(stage, messages):
        if stage == "consistency":
            return {u: ({"u3": [v for v in m["u3"] if v != 8]} if u < 4 else m)
                    for u, m in messages.items()}
        return messages

    refusals: dict = {}
    with pytest.raises(RoundAborted):
        run_local_round(config, inputs, tamper=equivocate, refusals=refusals)
    assert refusals  # some clients saw signatures over another U3


@pytest.mark.parametrize("field,value", [("graph_seed", bytes(32)), ("threshold", 7),
                                         ("round_id", 2)])
def test_a_client_sent_another_config_is_cut_off(field, value):
    """Node 1 is shown another round config: its commitment to the graph seed and its keys
    are bound to that config, so no graph and no key of it serves the others' round."""
    config, inputs = small_round()
    steps = Steps(config, inputs)
    messages = steps.server.setup()
    messages[1] = {**messages[1], field: value}  # node 1 is shown another round config
    messages = steps.server.collect_commitments(steps.ask("setup", messages))
    replies = steps.ask("advertise", messages)
    with pytest.raises(RoundAborted, match="node 1's reveal does not open"):
        steps.server.collect_keys(replies)
    seed_shares = {u: r["seed_share"] for u, r in replies.items()}
    with pytest.raises(ProtocolError, match="no graph"):  # a server that went on regardless
        steps.clients[2].share_keys({"seed_shares": seed_shares, "keys": {}})
    honest = Steps(config, inputs)  # the keys of node 1 cannot enter a round of the config
    forwarded = honest.until_keys()
    with pytest.raises(ProtocolError, match="not validly signed"):
        honest.clients[2].share_keys({**forwarded[2], "keys": {
            **forwarded[2]["keys"], 1: {f: replies[1][f] for f in (
                "c_pk", "s_pk", "sig_pk", "signature")}}})


def test_stages_run_in_order():
    config, inputs = small_round()
    client = SecAggClient(1)
    with pytest.raises(ProtocolError, match="cannot run"):
        client.masked_input({}, inputs[1])
    client.setup(config.to_message())
    with pytest.raises(ProtocolError, match="cannot run"):
        client.setup(config.to_message())


def test_low_order_mask_key_is_refused_by_clients_and_server():
    config, inputs = small_round()
    steps = Steps(config, inputs)
    commitments = steps.server.collect_commitments(steps.ask("setup", steps.server.setup()))
    replies = steps.ask("advertise", commitments)
    binding = joint_seed.commitments_digest(config, commitments[1]["commitments"])
    rogue = Ed25519PrivateKey.generate()  # node 2 advertises an all-zero mask key
    bad = {"c_pk": replies[2]["c_pk"], "s_pk": bytes(32), "sig_pk": public_bytes(rogue)}
    bad["signature"] = sign(rogue, keys_transcript(config, 2, *bad.values(), binding))
    bad["seed_share"] = replies[2]["seed_share"]
    messages = steps.server.collect_keys({**replies, 2: bad})
    assert 2 not in messages and 2 not in messages[1]["keys"]
    with pytest.raises(ProtocolError, match="malformed public keys"):
        steps.clients[1].share_keys({**messages[1], "keys": {**messages[1]["keys"], 2: bad}})
