"""Long-term identities of secure-aggregation sites, pinned out of band.

A site that holds an Ed25519 identity (node-config ``secagg-identity``: a file with its
private key) signs its round keys with it, and a site that lists its peers' public
identities (node-config ``secagg-peers``: a file, one hex key per line) accepts round keys
signed only by one of them, each at most once. The server then cannot impersonate a site
nor add parties of its own to a round: every neighbour a site masks with, and every
contributor it counts towards ``dp-min-honest``, is a site its operator pinned.

    python -m fedlora.secagg.identity site-a.key     # writes the key, prints its public key

Key files hold 64 hex digits (the raw 32-byte private key), written with mode 0600.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .crypto import KEY_BYTES, new_signing_key, public_bytes

__all__ = ["generate", "load_identity", "load_peers"]


def generate(path: str | os.PathLike[str]) -> str:
    """Write a new identity to ``path`` (refusing to overwrite one); its public key, hex."""
    key = new_signing_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.private_bytes_raw().hex() + "\n")
    return public_bytes(key).hex()


def load_identity(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The identity in ``path`` (``ValueError`` naming the file if it is not one)."""
    try:
        raw = bytes.fromhex(Path(path).read_text().strip())
        if len(raw) != KEY_BYTES:
            raise ValueError(f"{len(raw)} bytes")
        return Ed25519PrivateKey.from_private_bytes(raw)
    except (OSError, ValueError):  # (the message never quotes the file)
        raise ValueError(f"node-config 'secagg-identity' = {str(path)!r} is not a readable "
                         f"identity file of {2 * KEY_BYTES} hex digits") from None


def load_peers(path: str | os.PathLike[str]) -> frozenset[bytes]:
    """The public identities listed in ``path``, one hex key per line (``#`` comments)."""
    # Errors name lines, never their contents (a mistaken file could hold a private key,
    # and a site's refusal reasons go to the server).
    try:
        lines = [ln.split("#", 1)[0].strip() for ln in Path(path).read_text().splitlines()]
    except OSError as e:
        raise ValueError(f"node-config 'secagg-peers' = {str(path)!r} cannot be read "
                         f"({e.strerror})") from None
    keys, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError:
            key = b""
        (keys if len(key) == KEY_BYTES else bad).append(key if len(key) == KEY_BYTES
                                                        else number)
    if bad or not keys:
        raise ValueError(f"node-config 'secagg-peers' = {str(path)!r}: expected one "
                         f"{2 * KEY_BYTES}-digit hex key per line; "
                         f"{f'lines {bad} are not' if bad else 'no key found'}")
    return frozenset(keys)


if __name__ == "__main__":  # pragma: no cover - a command-line convenience
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m fedlora.secagg.identity KEY_FILE")
    print(generate(sys.argv[1]))
