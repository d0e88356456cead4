"""Flat forms of the protocol's messages and of a client's state between stages.

A transport whose records take string keys and flat values (bytes, ints, strings) carries
the plain dict messages of :mod:`fedlora.secagg.client` and :mod:`fedlora.secagg.server`
as :func:`flatten` writes them, read back by :func:`unflatten`:

* a nested dict becomes one key per leaf, its path joined by ``/``; an integer key (a node
  id) is written ``#`` and its 16 hex digits (``#0000000000000011`` for 17); every dict
  also leaves a ``<path>@dict`` marker, so that empty ones survive;
* a list or set of node ids becomes one byte string ``<path>@ids``, 8 big-endian bytes per
  id (node ids may exceed a signed 64-bit integer);
* bytes, ints and strings stay as they are.

Every node id takes the same room whatever its value, so the size of a flat message
follows from how many ids it names (:mod:`fedlora.secagg_bytes`).

A client between two stages is its secrets and what it has seen; :func:`dump_client`
turns a :class:`~fedlora.secagg.client.SecAggClient` into such a dict (private keys as raw
bytes) and :func:`load_client` rebuilds it, so that each stage may run in another process.
The dump holds the client's secrets: it must stay with the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .client import SecAggClient
from .common import RoundConfig
from .crypto import ID_BYTES, ids_bytes
from .floor import Floor

__all__ = ["dump_client", "flatten", "load_client", "unflatten"]

_DICT, _IDS = "@dict", "@ids"
_HEX = 2 * ID_BYTES  # hex digits of a node id in a key


def _segment(key: Any) -> str:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"cannot flatten a key of type {type(key).__name__}")
    if isinstance(key, int):
        if not 0 <= key < 2**64:
            raise ValueError(f"a node id key must lie in [0, 2^64), got {key}")
        return f"#{key:0{_HEX}x}"
    if not key or "/" in key or "@" in key or key.startswith("#"):
        raise ValueError(f"cannot flatten the key {key!r}")
    return key


def flatten(message: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``message`` as a flat dict of bytes, ints and strings (see the module docstring)."""
    out: dict[str, Any] = {}
    for key, value in message.items():
        path = prefix + _segment(key)
        if isinstance(value, Mapping):
            out[path + _DICT] = 0
            out.update(flatten(value, path + "/"))
        elif isinstance(value, (list, tuple, set, frozenset)):
            ids = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
                raise TypeError(f"{path}: only lists of node ids can be flattened")
            try:
                out[path + _IDS] = ids_bytes(*ids)
            except ValueError as e:
                raise TypeError(f"{path}: {e}") from None
        elif isinstance(value, (bytes, int, str)) and not isinstance(value, bool):
            out[path] = value
        else:
            raise TypeError(f"{path}: cannot flatten a value of type {type(value).__name__}")
    return out


def _key(segment: str) -> int | str:
    if segment.startswith("#"):
        try:
            if len(segment) != 1 + _HEX:
                raise ValueError
            return int(segment[1:], 16)
        except ValueError:
            raise ValueError(f"bad node id segment {segment!r}") from None
    return segment


def _place(root: dict, path: str, value: Any) -> None:
    *parents, last = path.split("/")
    node = root
    for segment in parents:
        node = node.setdefault(_key(segment), {})
        if not isinstance(node, dict):
            raise ValueError(f"{path!r} runs through a leaf")
    if isinstance(value, dict):
        node.setdefault(_key(last), value)
    else:
        node[_key(last)] = value


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict :func:`flatten` was given (``ValueError`` for a malformed one)."""
    out: dict[str, Any] = {}
    for path in sorted(flat):  # markers before leaves is not needed: setdefault merges
        value = flat[path]
        if path.endswith(_DICT):
            _place(out, path[: -len(_DICT)], {})
        elif path.endswith(_IDS):
            if not isinstance(value, bytes) or len(value) % ID_BYTES:
                raise ValueError(f"{path!r} must hold {ID_BYTES} bytes per node id")
            ids = [int.from_bytes(value[i:i + ID_BYTES], "big")
                   for i in range(0, len(value), ID_BYTES)]
            _place(out, path[: -len(_IDS)], ids)
        else:
            _place(out, path, value)
    return out


# How the attributes of a SecAggClient that are not plain values are written.
_SETS = ("neighbours", "_u2", "_u3")
_X25519 = ("_c_sk", "_s_sk")
# Long-term identities and the floor are not written: the node reads them again from its own
# settings (load_client's arguments), never from a state a stage could have altered.
_SKIP = ("_identity", "_known", "_trusted", "_floor")


def dump_client(client: SecAggClient) -> dict[str, Any]:
    """The client's whole state as a plain dict of its attributes (:func:`flatten` can
    write it), without its long-term identity (its private key is never written)."""
    if client._known is not None:
        raise ValueError("a client with identities by node id cannot be dumped")
    pinned = client._identity is not None
    out: dict[str, Any] = {"_pinned": [int(pinned)]}
    for name, value in vars(client).items():
        if name in _SKIP or (pinned and name == "_sig_sk"):
            continue
        if isinstance(value, RoundConfig):
            value = value.to_message()
        elif name in _X25519 or name == "_sig_sk":
            value = value.private_bytes_raw()
        elif name == "_held":
            value = {v: {"b": b, "s": s} for v, (b, s) in value.items()}
        elif name in _SETS:
            value = sorted(value)
        elif name == "node_id":
            value = [value]  # a node id may not fit a signed 64-bit integer
        out[name] = value
    return out


def load_client(state: Mapping[str, Any], *, identity: Ed25519PrivateKey | None = None,
                trusted: frozenset[bytes] | None = None,
                floor: Floor | None = None) -> SecAggClient:
    """The client :func:`dump_client` wrote (``ValueError`` for a malformed state, or for
    one written with a long-term identity that is not given again)."""
    try:
        pinned = bool(state.get("_pinned", [0])[0])
        if pinned != (identity is not None):
            raise ValueError("the state and the identity given disagree on whether this "
                             "node signs with a long-term identity")
        client = SecAggClient(int(state["node_id"][0]), identity=identity, trusted=trusted,
                              floor=floor)
        if pinned and "config" in state:
            client._sig_sk = identity
        for name, value in state.items():
            if name in ("node_id", "_pinned"):
                continue
            if name == "config":
                value = RoundConfig.from_message(value)
            elif name in _X25519:
                value = X25519PrivateKey.from_private_bytes(value)
            elif name == "_sig_sk":
                value = Ed25519PrivateKey.from_private_bytes(value)
            elif name == "_held":
                value = {int(v): (p["b"], p["s"]) for v, p in value.items()}
            elif name == "neighbours":
                value = frozenset(value)
            elif name in _SETS:
                value = set(value)
            setattr(client, name, value)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed client state: {exc!r}") from exc
    return client
