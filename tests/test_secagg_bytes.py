"""Every secure aggregation message's bytes, measured as the communication log measures
them, equal the formula of its stage (:mod:`fedlora.secagg_bytes`): a stage whose bytes
change without the formula changing fails here."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict

from fedlora.comms import CommsLog
from fedlora.secagg import COMPLETE, RoundConfig, SecAggClient, SecAggServer
from fedlora.secagg_bytes import STAGES, expected_bytes, round_bytes
from fedlora.secure_sum import from_records, protocol_bytes, to_records

COLLECT = {"setup": "collect_commitments", "advertise": "collect_keys",
           "share_keys": "collect_shares",
           "masked_input": "collect_masked", "consistency": "collect_signatures",
           "unmask": "aggregate"}


def _run(config: RoundConfig, gone: dict[str, set[int]]):
    """One round with every message through the records a round sends; per message, its
    measured bytes and the formula's, and each site's bytes per stage and direction."""
    rng = np.random.default_rng(1)
    vectors = {u: rng.integers(0, 2**config.bits, config.length, dtype=np.uint64)
               for u in config.cohort}
    clients = {u: SecAggClient(u) for u in config.cohort}
    server = SecAggServer(config)
    pairs, per_site = [], {}
    messages = server.setup()
    for stage in STAGES:
        replies = {}
        for u, body in messages.items():
            records = RecordDict(to_records(body, config.bits))
            pairs.append((stage, "down", u, protocol_bytes(records),
                          expected_bytes(server, stage, "down", u)))
            per_site.setdefault((u, stage), {})["down"] = protocol_bytes(records)
            if u in gone.get(stage, ()):
                continue
            message = from_records(records)
            reply = (clients[u].masked_input(message, vectors[u]) if stage == "masked_input"
                     else getattr(clients[u], stage)(message))
            records = RecordDict(to_records(reply, config.bits))
            pairs.append((stage, "up", u, protocol_bytes(records),
                          expected_bytes(server, stage, "up", u)))
            per_site[(u, stage)]["up"] = protocol_bytes(records)
            replies[u] = from_records(records)
        messages = getattr(server, COLLECT[stage])(replies)
    return messages, pairs, per_site


@pytest.mark.parametrize("sites, degree, threshold, bits, context", [
    (5, COMPLETE, 3, 11, b""),  # the int8 wire: uint16 masked vectors
    (12, 6, 4, 23, b""),  # a sparse graph, the float wire's levels: uint32
    (9, 8, 5, 7, bytes(32)),  # the int4 wire: uint8; a distributed DP round's context
    (6, COMPLETE, 4, 40, b""),  # uint64
])
def test_every_message_of_a_round_with_dropouts_is_its_formula(sites, degree, threshold, bits,
                                                               context):
    rng = np.random.default_rng(sites)
    cohort = [int(v) for v in rng.integers(1, 2**63, sites)] + [2**64 - 1]
    config = RoundConfig.create(7, cohort, length=33, bits=bits, degree=degree,
                                threshold=threshold, context=context)
    gone = {"share_keys": {cohort[0]}, "masked_input": {cohort[1]}}
    total, pairs, _ = _run(config, gone)
    assert len(total.survivors) == sites - 1
    wrong = [(s, d, u, m, a) for s, d, u, m, a in pairs if m != a]
    assert not wrong, wrong
    assert {(s, d) for s, d, *_ in pairs} == {(s, d) for s in STAGES for d in ("down", "up")}


def test_a_site_that_never_commits_shrinks_what_the_advertise_and_share_keys_stages_carry():
    cohort = [5, 2**33 + 7, 11, 2**62 + 3, 29, 2**64 - 2, 41, 97]
    config = RoundConfig.create(3, cohort, length=20, bits=11, degree=COMPLETE, threshold=4)
    gone = {"setup": {cohort[0]}, "share_keys": {cohort[1]}, "masked_input": {cohort[2]}}
    total, pairs, _ = _run(config, gone)
    assert len(total.survivors) == len(cohort) - 3
    wrong = [(s, d, u, m, a) for s, d, u, m, a in pairs if m != a]
    assert not wrong, wrong
    # 7 commitments of 61 bytes each (a key of 29 characters, 32 bytes) under a 24-byte marker.
    advertise = {a for s, d, _, _, a in pairs if (s, d) == ("advertise", "down")}
    assert advertise == {24 + 61 * 7}


def test_a_round_that_none_leaves_costs_each_site_its_stage_formulas():
    cohort = [3, 2**40 + 1, 17, 2**63 + 9]
    config = RoundConfig.create(2, cohort, length=50, bits=11, degree=COMPLETE)
    _, _, per_site = _run(config, {})
    predicted = round_bytes(len(cohort), config.degree, 50, 11)
    for (u, stage), measured in per_site.items():
        assert measured == predicted[stage], (u, stage)
    # The formulas themselves, pinned: 4 sites, 3 neighbours, 50 coordinates mod 2^11.
    assert predicted == {"setup": {"down": 164, "up": 42},
                         "advertise": {"down": 268, "up": 225},
                         "share_keys": {"down": 1215, "up": 591},
                         "masked_input": {"down": 629, "up": 100},
                         "consistency": {"down": 38, "up": 73},
                         "unmask": {"down": 356, "up": 319}}


def test_the_log_flags_a_secure_stage_whose_bytes_differ_from_its_formula():
    log = CommsLog()
    log.record_bytes(1, 5, "up", "train.secagg_setup", 183, 183)
    assert log.summary()["measured_equals_analytic"]
    log.record_bytes(1, 5, "up", "train.secagg_consistency", 80, 73)
    assert not log.summary()["measured_equals_analytic"]
