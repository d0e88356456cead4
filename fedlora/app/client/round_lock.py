"""One lock per node around a secure round's state in Flower's node state.

A site's protocol state for the round (:mod:`fedlora.app.client.secure_aggregation`) is
read from ``context.state``, advanced by one stage and written back. Two stage messages
delivered at once (a server that sends ``share_keys`` and ``masked_input`` together, or
two copies of one stage) would both read the same state: both copies of ``share_keys``
would share fresh secrets, both copies of ``masked_input`` would train (spending privacy
budget twice) and mask two updates with the same masks, whose difference the server
could read. :func:`round_lock` makes each stage's read-modify-write atomic per node and
run: the second message waits, then finds the stage already taken and is refused as out of
order, leaving the round's state as the first one left it.

The masked-input stage holds the lock from the check that the node is ready, through its
training, to the masked reply: the lock is re-entrant (the same thread takes it again in
:func:`~fedlora.app.client.secure_aggregation.masked_reply`). The lock orders the
handlers that run in one process on one node state object. Where each message runs in a
process of its own on a copy of the node state, no lock in the handler can order them:
the node's record of the stages it took (:mod:`fedlora.app.client.stage_claims`) refuses
the second copy there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app import Context

__all__ = ["round_lock"]

_GUARD = threading.Lock()
_LOCKS: dict[tuple[int, int], threading.RLock] = {}


def _lock_for(run_id: int, node_id: int) -> threading.RLock:
    with _GUARD:
        lock = _LOCKS.get((run_id, node_id))
        if lock is None:
            lock = _LOCKS[(run_id, node_id)] = threading.RLock()
        return lock


@contextmanager
def round_lock(context: Context) -> Iterator[None]:
    """Hold the lock of ``context``'s node and run for the duration of the block."""
    lock = _lock_for(int(context.run_id), int(context.node_id))
    with lock:
        yield
