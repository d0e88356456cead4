"""Cryptographic primitives of secure aggregation, over the ``cryptography`` package.

* Key agreement: X25519. Each client has two key pairs per round, ``c`` (encrypts the
  Shamir shares it sends its neighbours) and ``s`` (seeds the pairwise masks).
* Key derivation: HKDF-SHA256 over the X25519 shared secret. The ``info`` string names the
  use (:data:`MASK_LABEL` or :data:`ENCRYPTION_LABEL`), the round and the unordered pair of
  node ids, so a shared secret never yields the same key for two uses, two rounds or two
  pairs.
* Authenticated encryption: ChaCha20-Poly1305 with a fresh random 96-bit nonce per message
  and associated data binding (label, round, sender, receiver): a ciphertext moved to
  another round, another sender or another receiver fails to decrypt.
* Signatures: Ed25519 (a client's advertised keys, and the consistency check).

Every secret comes from the operating system's entropy (``os.urandom`` through
``cryptography`` and :mod:`secrets`); nothing here accepts a seed.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "ENCRYPTION_LABEL", "KEY_BYTES", "MASK_LABEL", "CryptoError", "agree", "decrypt",
    "encrypt", "ids_bytes", "new_agreement_key", "new_signing_key", "public_bytes",
    "secret_bytes", "sign", "usable_public_key", "verify",
]

#: Length of keys, seeds and derived keys, in bytes.
KEY_BYTES = 32
#: HKDF ``info`` prefix of the pairwise mask seed s_uv.
MASK_LABEL = b"fedlora-secagg/v1/pairwise-mask-seed"
#: HKDF ``info`` prefix of the key that encrypts shares between two clients.
ENCRYPTION_LABEL = b"fedlora-secagg/v1/share-encryption-key"
#: Associated-data prefix of encrypted shares.
SHARES_AAD_LABEL = b"fedlora-secagg/v1/shares"
NONCE_BYTES = 12
ID_BYTES = 8


class CryptoError(ValueError):
    """A key, a ciphertext or a signature is malformed or does not verify."""


def ids_bytes(*values: int) -> bytes:
    """Fixed-width big-endian encoding of node ids and round ids (each in [0, 2^64))."""
    out = bytearray()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
            raise CryptoError(f"an id must be an integer in [0, 2^64), got {value!r}")
        out += value.to_bytes(ID_BYTES, "big")
    return bytes(out)


def new_agreement_key() -> X25519PrivateKey:
    """A fresh X25519 private key (OS entropy)."""
    return X25519PrivateKey.generate()


def new_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key (OS entropy)."""
    return Ed25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of a private key."""
    return key.public_key().public_bytes_raw()


def secret_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte X25519 private key (what a client secret-shares)."""
    return key.private_bytes_raw()


def usable_public_key(public: object) -> bool:
    """Whether ``public`` is a 32-byte X25519 key that yields a non-zero shared secret."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except (ValueError, TypeError):
        return False
    return True


def agree(private: X25519PrivateKey, peer_public: bytes, *, label: bytes, round_id: int,
          node: int, peer: int) -> bytes:
    """A 32-byte key shared by ``node`` and ``peer``: HKDF-SHA256 of their X25519 secret.

    ``info`` is ``label | round | min(node, peer) | max(node, peer)``, so both ends derive
    the same key and distinct uses, rounds and pairs derive unrelated keys.
    """
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # wrong length, or a low-order point (all-zero secret)
        raise CryptoError(f"bad X25519 public key from node {peer}: {exc}") from exc
    info = label + ids_bytes(round_id, min(node, peer), max(node, peer))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def _aad(round_id: int, sender: int, receiver: int) -> bytes:
    return SHARES_AAD_LABEL + ids_bytes(round_id, sender, receiver)


def encrypt(key: bytes, plaintext: bytes, *, round_id: int, sender: int, receiver: int) -> bytes:
    """``nonce | ChaCha20-Poly1305(plaintext)`` bound to (round, sender, receiver)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext,
                                                 _aad(round_id, sender, receiver))


def decrypt(key: bytes, blob: bytes, *, round_id: int, sender: int, receiver: int) -> bytes:
    """Open :func:`encrypt`'s output; :class:`CryptoError` if it was forged or moved."""
    if not isinstance(blob, bytes) or len(blob) < NONCE_BYTES + 16:
        raise CryptoError(f"ciphertext from node {sender} is too short")
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                             _aad(round_id, sender, receiver))
    except InvalidTag as exc:
        raise CryptoError(f"ciphertext from node {sender} to node {receiver} does not "
                          "authenticate (forged, altered or replayed)") from exc


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """An Ed25519 signature of ``message``."""
    return key.sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` under ``public``."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
