"""A privacy budget's state and its ledger files: plain JSON, exact round trips, atomic
saves with a backup, and no spent budget ever forgotten."""

from __future__ import annotations

import json

import pytest

from fedlora.privacy import (
    PrivacyBudget,
    PrivacyStateError,
    from_record_dict,
    load_state,
    save_state,
    to_record_dict,
)

from .test_privacy import DELTA

# --------------------------------------------------------------------------- persistence


def _used_accountant(mechanism: str = "rdp") -> PrivacyBudget:
    acc = PrivacyBudget(mechanism, target_epsilon=3.0, target_delta=DELTA)
    acc.step(noise_multiplier=1.1, sample_rate=0.03125, num_steps=10)
    acc.step(noise_multiplier=1.1, sample_rate=0.03125, num_steps=10)
    acc.step(noise_multiplier=0.9000000000000001, sample_rate=1 / 3, num_steps=1)
    return acc


def test_state_dict_is_plain_json_and_round_trips():
    acc = _used_accountant()
    state = acc.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["version"] == 2 and state["mechanism"] == "rdp"
    assert state["history"] == [[1.1, 0.03125, 20], [0.9000000000000001, 1 / 3, 1]]
    back = PrivacyBudget.from_state_dict(json.loads(json.dumps(state)))
    assert back.history == acc.history and back.epsilon(DELTA) == acc.epsilon(DELTA)
    assert (back.target_epsilon, back.target_delta) == (3.0, DELTA)
    fresh = PrivacyBudget("rdp")
    fresh.load_state_dict(state)
    assert fresh.history == acc.history
    with pytest.raises(PrivacyStateError):
        acc.load_state_dict(PrivacyBudget("rdp").state_dict())  # would forget steps
    for bad in [{**state, "version": 3}, {**state, "mechanism": "gdp"},
                {**state, "history": [[1.0, 0.1]]}, {**state, "history": [[-1.0, 0.1, 3]]},
                {**state, "history": "[[1.0, 0.1, 3]]"}]:
        with pytest.raises(PrivacyStateError):
            PrivacyBudget.from_state_dict(bad)


def test_record_dict_round_trip_is_exact():
    for acc in (_used_accountant("rdp"), _used_accountant("prv"), PrivacyBudget("rdp")):
        record = to_record_dict(acc)
        assert all(isinstance(k, str) and isinstance(v, (str, float, int))
                   for k, v in record.items())
        back = from_record_dict(dict(record))
        assert back.state_dict() == acc.state_dict()
        assert to_record_dict(back) == record
    with pytest.raises(PrivacyStateError):
        from_record_dict({"version": 1, "mechanism": "rdp", "history": "[[1.0, 0.1, 3]"})
    with pytest.raises(PrivacyStateError):
        from_record_dict({**to_record_dict(_used_accountant()), "total_steps": 3})


def test_save_load_round_trip_and_backup(tmp_path):
    path = tmp_path / "ledger" / "client-3.json"
    assert load_state(path) is None
    acc = _used_accountant()
    save_state(path, acc)
    assert not path.with_name(path.name + ".bak").exists()
    loaded = load_state(path)
    assert loaded.state_dict() == acc.state_dict()
    acc.step(noise_multiplier=1.1, sample_rate=0.03125, num_steps=10)
    save_state(path, acc)
    bak = path.with_name(path.name + ".bak")
    assert load_state(bak).total_steps == acc.total_steps - 10  # the previous save
    assert load_state(path).state_dict() == acc.state_dict()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, bak.name]  # no temps


def test_save_refuses_to_forget_spent_budget(tmp_path):
    path = tmp_path / "ledger.json"
    save_state(path, _used_accountant())
    with pytest.raises(PrivacyStateError):
        save_state(path, PrivacyBudget("rdp"))
    shorter = PrivacyBudget("rdp")
    shorter.step(noise_multiplier=1.1, sample_rate=0.03125, num_steps=19)
    with pytest.raises(PrivacyStateError):
        save_state(path, shorter)
    assert load_state(path).state_dict() == _used_accountant().state_dict()
    save_state(path, PrivacyBudget("rdp"), allow_rewind=True)  # explicit only
    assert load_state(path).total_steps == 0


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "flip", "delete"])
def test_corrupt_ledger_falls_back_to_backup(tmp_path, damage):
    path = tmp_path / "ledger.json"
    first = _used_accountant()
    save_state(path, first)
    second = _used_accountant()
    second.step(noise_multiplier=1.1, sample_rate=0.03125, num_steps=5)
    save_state(path, second)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff not json")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flip":  # still valid JSON, but the checksum no longer matches
        path.write_bytes(data.replace(b"0.03125", b"0.03126"))
    else:
        path.unlink()
    loaded = load_state(path)
    assert loaded is not None and loaded.state_dict() == first.state_dict()
    # saving again must not replace the good backup with the damaged file
    third = PrivacyBudget.from_state_dict(second.state_dict())
    third.step(noise_multiplier=1.1, sample_rate=0.03125, num_steps=5)
    save_state(path, third)
    assert load_state(path).state_dict() == third.state_dict()
    assert load_state(path.with_name(path.name + ".bak")).state_dict() == first.state_dict()


def test_both_ledgers_unusable_raises(tmp_path):
    path = tmp_path / "ledger.json"
    acc = _used_accountant()
    save_state(path, acc)
    acc.step(noise_multiplier=1.1, sample_rate=0.03125, num_steps=1)
    save_state(path, acc)
    bak = path.with_name(path.name + ".bak")
    path.write_text("{")
    bak.write_text('{"format": "fedlora-privacy-ledger"')
    with pytest.raises(PrivacyStateError):
        load_state(path)
    with pytest.raises(PrivacyStateError):  # and no silent overwrite of the lost ledger
        save_state(path, PrivacyBudget("rdp"))
    path.unlink()
    with pytest.raises(PrivacyStateError):  # only the (corrupt) backup left
        load_state(path)
