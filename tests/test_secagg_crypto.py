"""Key agreement, derivation, encryption and signatures (fedlora.secagg.crypto)."""

from __future__ import annotations

import pytest

from fedlora.secagg.crypto import (
    ENCRYPTION_LABEL,
    MASK_LABEL,
    CryptoError,
    agree,
    decrypt,
    encrypt,
    new_agreement_key,
    new_signing_key,
    public_bytes,
    sign,
    usable_public_key,
    verify,
)


def test_agreement_is_symmetric_and_separated_by_use_round_and_pair():
    a, b, c = new_agreement_key(), new_agreement_key(), new_agreement_key()
    key = agree(a, public_bytes(b), label=MASK_LABEL, round_id=3, node=1, peer=2)
    assert key == agree(b, public_bytes(a), label=MASK_LABEL, round_id=3, node=2, peer=1)
    assert len(key) == 32
    others = [
        agree(a, public_bytes(b), label=ENCRYPTION_LABEL, round_id=3, node=1, peer=2),
        agree(a, public_bytes(b), label=MASK_LABEL, round_id=4, node=1, peer=2),
        agree(a, public_bytes(b), label=MASK_LABEL, round_id=3, node=1, peer=5),
        agree(a, public_bytes(c), label=MASK_LABEL, round_id=3, node=1, peer=2),
    ]
    assert len({key, *others}) == 5


def test_agreement_rejects_bad_public_keys():
    a = new_agreement_key()
    assert usable_public_key(public_bytes(new_agreement_key()))
    assert not any(usable_public_key(k) for k in (bytes(32), b"short", None))
    for bad in (bytes(32), b"short"):  # a low-order point, a wrong length
        with pytest.raises(CryptoError):
            agree(a, bad, label=MASK_LABEL, round_id=1, node=1, peer=2)


def test_encryption_binds_round_sender_and_receiver():
    key = bytes(range(32))
    blob = encrypt(key, b"shares", round_id=5, sender=1, receiver=2)
    assert decrypt(key, blob, round_id=5, sender=1, receiver=2) == b"shares"
    assert encrypt(key, b"shares", round_id=5, sender=1, receiver=2) != blob  # fresh nonce
    for moved in ({"round_id": 6, "sender": 1, "receiver": 2},
                  {"round_id": 5, "sender": 2, "receiver": 1},
                  {"round_id": 5, "sender": 1, "receiver": 3}):
        with pytest.raises(CryptoError):
            decrypt(key, blob, **moved)
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(CryptoError):
        decrypt(key, flipped, round_id=5, sender=1, receiver=2)
    with pytest.raises(CryptoError):
        decrypt(bytes(32), blob, round_id=5, sender=1, receiver=2)


def test_signatures():
    key = new_signing_key()
    signature = sign(key, b"message")
    assert verify(public_bytes(key), signature, b"message")
    assert not verify(public_bytes(key), signature, b"messagf")
    assert not verify(public_bytes(new_signing_key()), signature, b"message")
    assert not verify(b"bad", signature, b"message")
    assert not verify(public_bytes(key), None, b"message")
