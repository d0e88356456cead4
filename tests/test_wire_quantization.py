"""int8/int4 on the wire: exact byte counts, bounded rounding, error feedback, both directions."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from fedlora.comms import CommsLog
from fedlora.quantization import (
    ErrorFeedback,
    decode_bytes,
    encode_bytes,
    quantize,
    quantized_bytes,
)
from fedlora.wire import WireFormat, from_record, to_record

from .test_simulation import run_in_process

QMAX = {"int8": 127, "int4": 7}


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(8, 384), (384, 8), (7, 3), (1,), (0, 4)])
def test_round_trip_is_within_half_a_step_and_sized_as_predicted(dtype, shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * rng.uniform(1e-4, 10, size=shape)).astype(np.float32)
    data, sent = encode_bytes(x, dtype, 64)
    assert len(data) == quantized_bytes(x.size, dtype, 64)
    back = decode_bytes(data, dtype, shape)
    np.testing.assert_array_equal(back, sent)  # the sender knows what the receiver gets
    flat, err = x.ravel(), np.abs(back - x).ravel()
    for i in range(0, flat.size, 64):  # per block: at most half a step of its own scale
        block = flat[i:i + 64]
        step = np.abs(block).max() / QMAX[dtype]
        assert err[i:i + 64].max() <= step * 0.5 * (1 + 2 ** -9) + 1e-30


def test_byte_counts_match_the_documented_layout():
    # header 4 + one float16 scale per block + codes (two int4 per byte, odd counts padded)
    assert quantized_bytes(3072, "int8", 64) == 4 + 2 * 48 + 3072
    assert quantized_bytes(3072, "int4", 64) == 4 + 2 * 48 + 1536
    assert quantized_bytes(65, "int4", 64) == 4 + 2 * 2 + 33
    # A rank-8 LoRA pair of a 384x384 projection: int8 at most 0.27 of float32,
    # int4 at most 0.14.
    n = 8 * (384 + 384)
    assert quantized_bytes(n, "int8", 64) / (4 * n) <= 0.27
    assert quantized_bytes(n, "int4", 64) / (4 * n) <= 0.14


def test_zero_tiny_and_huge_values():
    z = np.zeros((4, 64), np.float32)
    assert not decode_bytes(encode_bytes(z, "int4", 64)[0], "int4", z.shape).any()
    tiny = np.full((64,), 1e-9, np.float32)  # below float16's range: nothing blows up
    assert np.isfinite(decode_bytes(encode_bytes(tiny, "int8", 64)[0], "int8", (64,))).all()
    with pytest.raises(ValueError, match="too large"):
        quantize(np.array([1e9], np.float32), "int8", 64)
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.array([np.nan], np.float32), "int4", 64)


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    x = np.full(64, 0.3, np.float32)
    x[0] = 7.0  # scale 1: 0.3 falls between codes 0 and 1
    rng = np.random.default_rng(1)
    mean = np.mean([encode_bytes(x, "int4", 64, rng)[1][1:] for _ in range(2000)])
    assert abs(mean - 0.3) < 0.02
    assert np.all(encode_bytes(x, "int4", 64)[1][1:] == 0.0)  # nearest: always 0


def test_error_feedback_delivers_what_nearest_rounding_loses():
    """A sender that sends the same values every round: without feedback the same rounding
    error every time; with it, the running mean of what arrives converges to the values."""
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, size=(16, 64)).astype(np.float32)
    wire = WireFormat(dtype="int4", block_size=64)
    fb = ErrorFeedback()
    plain = from_record(to_record({"a": x}, wire))["a"]
    got = [from_record(to_record({"a": x}, wire, feedback=fb))["a"] for _ in range(50)]
    err_plain = np.abs(plain - x).mean()
    err_fb = np.abs(np.mean(got, axis=0) - x).mean()
    assert err_plain > 0.02 and err_fb < err_plain / 10
    # bounded: half a step of a scale that the residual itself enlarges a little
    assert np.abs(fb.residuals["a"]).max() <= 0.5 * (1 + 0.5 / 7) / 7 * 1.01


def test_feedback_keeps_its_overlap_when_a_shape_grows():
    fb = ErrorFeedback({"b": np.ones((3, 2), np.float32)})
    out = fb.target("b", np.zeros((3, 4), np.float32))
    np.testing.assert_array_equal(out[:, :2], 1.0)
    np.testing.assert_array_equal(out[:, 2:], 0.0)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_damaged_array_is_refused(dtype):
    data, _ = encode_bytes(np.linspace(-1, 1, 100, dtype=np.float32), dtype, 64)
    with pytest.raises(ValueError, match="expected"):
        decode_bytes(data[:-1], dtype, (100,), "k")
    with pytest.raises(ValueError, match="expected"):
        decode_bytes(data, dtype, (101,), "k")
    bad = bytearray(data)
    bad[4:6] = np.array([np.inf], "<f2").tobytes()
    with pytest.raises(ValueError, match="scales"):
        decode_bytes(bytes(bad), dtype, (100,), "k")
    # A sender's huge block size costs the receiver nothing (one scale for all 100 values).
    huge = (2 ** 32 - 1).to_bytes(4, "little") + data[4:6] + data[4 + 2 * 2:]
    assert decode_bytes(huge, dtype, (100,), "k").shape == (100,)
    if dtype == "int4":  # nibble 0 would be code -8, outside [-7, 7]
        bad = bytearray(data)
        bad[-1] = 0
        with pytest.raises(ValueError, match="codes"):
            decode_bytes(bytes(bad), dtype, (100,), "k")


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_ledger_predicts_quantised_bytes_from_shapes(dtype):
    state = {"m.lora_A.weight": np.ones((4, 33), np.float32),
             "m.lora_B.weight": np.ones((31, 4), np.float32),
             "classifier.bias": np.ones(2, np.float32)}
    log = CommsLog(block_size=16)
    entry = log.record(1, 1, "up", "train", to_record(state, WireFormat(dtype, 16)))
    assert entry.bytes == entry.analytic_bytes
    assert entry.factor_bytes == quantized_bytes(132, dtype, 16) + quantized_bytes(124, dtype, 16)


# Every aggregator on an int8 or int4 wire, end to end: tests/test_methods.py.


# -- under DP: quantisation is post-processing of what the mechanism released ------------

from .test_dp_attacks import _diff, _released, _run_site, _train_message, _update_noise_std  # noqa: E402,I001
from .conftest import assert_noise_std  # noqa: E402,I001


def test_under_dp_the_wire_quantises_only_the_noised_release(identity, site, monkeypatch):
    """The quantiser (and its error feedback) sees the mechanism's output and nothing else,
    and the noise survives it: two replays of the same site differ by the full noise."""
    from fedlora import quantization
    from fedlora.privacy.update_level import UpdateLevel

    run_config = dict(site, **{"dp-mode": "update", "wire-dtype": "int8"})
    msg = _train_message(run_config)
    released, quantised = [], []
    real_release, real_quantize = UpdateLevel.release, quantization.quantize

    def spy_release(self, *a, **k):
        released.append(real_release(self, *a, **k))
        return released[-1]

    def spy_quantize(x, *a, **k):
        quantised.append(np.array(x, copy=True))
        return real_quantize(x, *a, **k)

    monkeypatch.setattr(UpdateLevel, "release", spy_release)
    monkeypatch.setattr(quantization, "quantize", spy_quantize)
    node = {"partition-id": 0, "num-partitions": 2}
    first = _released(_run_site(run_config, node, msg))
    keys = list(released[0])
    assert len(quantised) == len(keys)
    for k, q in zip(keys, quantised):  # round 1: no residual yet, exactly the release
        np.testing.assert_array_equal(q, released[0][k].astype(np.float32))
        step = np.abs(q).max() / 127
        assert np.abs(first[k] - q).max() <= step  # what arrives: the release, rounded
    replay = _released(_run_site(run_config, node, msg))
    std = _update_noise_std(run_config)
    assert_noise_std(_diff(first, replay), np.sqrt(2) * std)


# -- error feedback state: clients keep theirs in context.state, the server in its checkpoint --


def _capture_mod(path):
    """Writes (to ``path``: clients run in other processes) each training broadcast's round
    and digest of its bytes and, after the reply, whether the node's context.state holds its
    wire residual."""
    from fedlora.app.client.client_app import WIRE_STATE_KEY
    from fedlora.protocol import CONFIG_KEY, LORA_KEY

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            down = hashlib.sha256(b"".join(
                k.encode() + bytes(a.data) for k, a in sorted(msg.content[LORA_KEY].items())))
            with open(path, "a") as f:
                f.write(json.dumps({"round": int(msg.content[CONFIG_KEY]["server-round"]),
                                    "down": down.hexdigest(),
                                    "keys": sorted(msg.content[LORA_KEY].keys()),
                                    "residual": WIRE_STATE_KEY in context.state}) + "\n")
        return reply

    return mod


def _read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_feedback_residuals_live_in_node_state_and_in_the_checkpoint(custom_task, tmp_path):
    from fedlora.checkpoint import load_checkpoint

    base = dict(custom_task, **{"wire-dtype": "int4", "wire-block-size": 16,
                                "fraction-train": 1.0, "fraction-evaluate": 0.0})
    run_in_process(dict(base, **{"num-server-rounds": 3, "run-name": "ef-whole"}), num_nodes=2,
                   mods=[_capture_mod(tmp_path / "whole.jsonl")])
    whole = _read(tmp_path / "whole.jsonl")
    assert len(whole) == 6 and all(s["residual"] for s in whole)  # every client kept one
    overrides = dict(base, **{"num-server-rounds": 2, "run-name": "ef-split"})
    run_dir = run_in_process(overrides, num_nodes=2)
    ckpt = load_checkpoint(run_dir)
    assert set(ckpt.wire_state) == set(whole[0]["keys"])
    assert any(np.abs(v).max() > 0 for v in ckpt.wire_state.values())
    run_in_process(dict(overrides, **{"num-server-rounds": 3, "resume": True}), num_nodes=2,
                   mods=[_capture_mod(tmp_path / "split.jsonl")])
    # The resumed server's round-3 broadcast is bit for bit the uninterrupted one's: the
    # global adapter and the broadcast residual both came back from the checkpoint.
    want = {s["down"] for s in whole if s["round"] == 3}
    got = {s["down"] for s in _read(tmp_path / "split.jsonl") if s["round"] == 3}
    assert len(want) == 1 and got == want


# -- what a hostile sender can and cannot do ------------------------------------------------


def _strategy(wire="int4", aggregator="fedavg", max_update_norm=50.0):
    from fedlora.aggregation import get_method
    from fedlora.app.server.strategy import LoraStrategy

    rng = np.random.default_rng(5)
    template = {"m.lora_A.weight": rng.normal(size=(4, 64)).astype(np.float32),
                "m.lora_B.weight": np.zeros((64, 4), np.float32)}
    method = get_method(aggregator, alpha=8.0, rank=4)
    strategy = LoraStrategy(method=method, template=template, fraction_train=1.0,
                            fraction_evaluate=0.0, wire=WireFormat(wire, 16),
                            max_update_norm=max_update_norm)
    strategy.global_state = template
    strategy._messages(1, from_record(to_record(template)), _config(), [1], "train")
    return strategy, template


def _config():
    from flwr.app import ConfigRecord

    return ConfigRecord({})


def _reply_message(arrays, identity_ok=True):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedlora.protocol import LORA_KEY, METRICS_KEY, STATUS_KEY

    return Message(content=RecordDict({LORA_KEY: arrays,
                                       METRICS_KEY: MetricRecord({"num-examples": 10}),
                                       STATUS_KEY: ConfigRecord({"status": "ok"})}),
                   dst_node_id=0, message_type="train")


def test_crafted_replies_are_refused_not_fatal(identity):
    from flwr.app import Array, ArrayRecord

    strategy, template = _strategy()
    honest = to_record(template, WireFormat("int4", 16))
    strategy._check_reply(_reply_message(honest))  # accepted
    k = "m.lora_A.weight"
    crafted = {
        "foreign serialisation": Array(dtype="int4", shape=(4, 64), stype="garbage", data=b"x"),
        "other block size": to_record({k: template[k]}, WireFormat("int4", 32))[k],
        "unknown dtype": Array(dtype="bogus", shape=(4, 64), stype="fedlora.raw-le", data=b""),
    }
    for why, arr in crafted.items():
        arrays = ArrayRecord({**dict(honest.items()), k: arr})
        with pytest.raises(ValueError):
            strategy._check_reply(_reply_message(arrays))
        strategy.comms_log = CommsLog()
        strategy.comms_log.record(1, 1, "up", "train", arrays)  # the log does not crash


def test_rounding_does_not_count_as_update_but_a_real_change_does(identity):
    """An honest int4 reply that changed nothing is measured as (almost) no change, though
    its values moved by rounding; a reply that moved one value far is still measured."""
    strategy, template = _strategy(max_update_norm=0.5)
    fb = ErrorFeedback()
    for _ in range(3):  # rounding residuals of a few rounds
        reply = to_record(template, WireFormat("int4", 16), feedback=fb)
    raw = np.sqrt(sum(np.sum((v - template[k]) ** 2) for k, v in from_record(reply).items()))
    assert raw > 0.5  # measured naively, rounding alone would be refused
    strategy._check_reply(_reply_message(reply))
    assert strategy.outcome.update_norms[-1] < 0.01 * raw
    moved = dict(template, **{"m.lora_B.weight": np.full((64, 4), 0.0, np.float32)})
    moved["m.lora_B.weight"][0, 0] = 5.0
    with pytest.raises(ValueError, match="update norm"):
        strategy._check_reply(_reply_message(to_record(moved, WireFormat("int4", 16))))


def test_a_checkpoint_from_before_the_wire_keys_resumes():
    from fedlora.checkpoint import config_differences
    from fedlora.config import defaults

    old = {k: v for k, v in defaults().items() if not k.startswith("wire-") or k == "wire-dtype"}
    assert config_differences(old, defaults()) == []
    assert config_differences(old, dict(defaults(), **{"wire-block-size": 32})) == \
        ["wire-block-size"]
