"""Secure aggregation rounds end to end, in-process (fedlora.secagg client/server/local)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.secagg import (
    ProtocolError,
    RoundAborted,
    RoundConfig,
    bits_for,
    encode,
    run_local_round,
)

LENGTH = 1000
MAX_ABS = 5000


def make_round(n: int = 10, degree="all", threshold=None, round_id: int = 1):
    cohort = [10_000 + 13 * i for i in range(n)]
    bits = bits_for(n, MAX_ABS, signed=True)
    config = RoundConfig.create(round_id, cohort, length=LENGTH, bits=bits, degree=degree,
                                threshold=threshold)
    rng = np.random.default_rng(round_id)  # test data only
    plain = {u: rng.integers(-MAX_ABS, MAX_ABS + 1, LENGTH) for u in cohort}
    return config, plain, {u: encode(x, bits) for u, x in plain.items()}


def expected(plain, survivors):
    return sum(plain[u] for u in survivors)


@pytest.mark.parametrize("n,degree", [(10, "all"), (12, 4), (11, 6)])
def test_no_dropouts_sum_is_exact(n, degree):
    config, plain, inputs = make_round(n, degree)
    result = run_local_round(config, inputs)
    assert result.survivors == config.cohort
    assert result.bits == bits_for(n, MAX_ABS, signed=True)
    assert np.array_equal(result.signed(), expected(plain, config.cohort))
    assert result.total.dtype == np.uint64 and int(result.total.max()) < 2**result.bits


def test_worst_case_inputs_do_not_wrap():
    config, _, _ = make_round(10)
    for value in (MAX_ABS, -MAX_ABS):
        inputs = {u: encode(np.full(LENGTH, value), config.bits) for u in config.cohort}
        result = run_local_round(config, inputs)
        assert np.all(result.signed() == 10 * value)


@pytest.mark.parametrize("degree", ["all", 6])
def test_dropouts_before_masked_input(degree):
    config, plain, inputs = make_round(12, degree)
    dropped = set(config.cohort[2:4])
    result = run_local_round(config, inputs, dropouts={"masked_input": dropped})
    assert set(result.survivors) == set(config.cohort) - dropped
    assert np.array_equal(result.signed(), expected(plain, result.survivors))


def test_dropouts_before_sharing_keys_and_at_setup():
    config, plain, inputs = make_round(12)
    result = run_local_round(config, inputs, dropouts={"setup": [config.cohort[0]],
                                                       "share_keys": [config.cohort[5]]})
    assert set(result.survivors) == set(config.cohort) - {config.cohort[0], config.cohort[5]}
    assert np.array_equal(result.signed(), expected(plain, result.survivors))


@pytest.mark.parametrize("stage", ["consistency", "unmask"])
def test_dropout_after_masked_input_is_still_summed(stage):
    config, plain, inputs = make_round(10, 6)
    late = config.cohort[7]
    result = run_local_round(config, inputs, dropouts={stage: [late],
                                                       "masked_input": [config.cohort[1]]})
    assert late in result.survivors and config.cohort[1] not in result.survivors
    assert np.array_equal(result.signed(), expected(plain, result.survivors))


def test_too_few_survivors_release_nothing():
    config, _, inputs = make_round(10)  # complete graph: degree 9, threshold 6
    assert config.threshold == 6
    refusals: dict = {}
    with pytest.raises(RoundAborted, match="released nothing"):
        run_local_round(config, inputs, dropouts={"masked_input": config.cohort[:4]},
                        refusals=refusals)
    assert refusals == {}  # the server stops before asking anyone to unmask


def test_clients_refuse_below_threshold_even_if_the_server_goes_on():
    config, _, inputs = make_round(12, 6)  # degree 6, threshold 4
    victim = config.cohort[0]
    refusals: dict = {}
    dropouts: dict = {"masked_input": []}

    def drop_three_neighbours(stage, messages):  # the graph is known once seeds are revealed
        if stage == "share_keys":
            dropouts["masked_input"] = sorted(messages[victim]["keys"])[:3]
        return messages

    with pytest.raises(RoundAborted, match="released nothing"):
        run_local_round(config, inputs, dropouts=dropouts, refusals=refusals,
                        tamper=drop_three_neighbours)
    assert isinstance(refusals[victim], ProtocolError)
    assert "neighbours in U3" in str(refusals[victim])


def test_too_few_shares_at_unmask_release_nothing():
    config, _, inputs = make_round(10)  # threshold 6 of 9
    with pytest.raises(RoundAborted, match="released nothing"):
        run_local_round(config, inputs, dropouts={"unmask": config.cohort[:5]})


def test_config_round_trip_and_validation():
    config, _, _ = make_round(10, 4)
    assert RoundConfig.from_message(config.to_message()) == config
    for field, bad in (("threshold", 2), ("degree", 3), ("bits", 63), ("length", 0),
                       ("graph_seed", b"x"), ("cohort", [1, 1, 2])):
        with pytest.raises(ValueError):
            RoundConfig.from_message({**config.to_message(), field: bad})
    with pytest.raises(ValueError):
        RoundConfig.from_message({"round_id": 1})
