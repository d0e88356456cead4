"""The stages of a secure round a node has taken, recorded outside Flower's node state.

Flower hands each message a copy of the node state and keeps the copy the handler
returns: a deployed SuperNode runs each message in a ``flwr-clientapp`` process of its
own, and a simulation in whichever backend worker is free. Two stage messages delivered at
once then each read the state as it was before either ran, and a lock inside the handler
(:mod:`fedlora.app.client.round_lock`) cannot order them. So a node also records which
stage of each round it has taken, in a file of its own locked with ``fcntl.flock`` while it
is read and written: :func:`take` lets a stage through once, and only right after the one
before it (setup first). A second copy of a stage, or a stage whose predecessor was never
taken here, is refused whatever the copy of the node state it was handed says.

A round's file is named by the run, the node and the digest of the round config, and
holds the name of the last stage taken (no secret). Files live in a folder of the system's
temporary directory that only the user can open; files a day old are removed when the node
sets up a new round of the same run.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path

from flwr.app import Context

from fedlora.secagg import ProtocolError

__all__ = ["ORDER", "take"]

#: The stages of a round, in the order a node takes them.
ORDER = ("setup", "advertise", "share_keys", "masked_input", "consistency", "unmask")
#: Files of rounds older than this (seconds) are removed at a new setup.
MAX_AGE_S = 86400.0


def _folder() -> Path:
    folder = Path(tempfile.gettempdir()) / f"fedlora-secagg-stages-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _forget_old(folder: Path, prefix: str) -> None:
    now = time.time()
    for path in folder.glob(prefix + "*"):
        try:
            if now - path.stat().st_mtime > MAX_AGE_S:
                path.unlink()
        except OSError:
            continue  # another process removed it first


def take(context: Context, digest: bytes, stage: str) -> None:
    """Record that this node takes ``stage`` of the round whose config has ``digest``;
    ``ProtocolError`` when it took that stage already or not the one before it."""
    if stage not in ORDER:
        raise ValueError(f"unknown stage {stage!r}; stages are {ORDER}")
    before = "" if stage == "setup" else ORDER[ORDER.index(stage) - 1]
    prefix = f"{int(context.run_id)}-{int(context.node_id)}-"
    try:
        folder = _folder()
        fd = os.open(folder / (prefix + digest.hex()), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise ProtocolError(f"this node cannot record the stages it takes ({e.strerror})"
                            ) from None
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        taken = f.read().strip()
        if taken != before:
            raise ProtocolError(f"this node cannot take stage {stage!r} of this round: "
                                f"its last stage taken is {taken or 'none'!r} (a copy "
                                "delivered twice, or out of order)")
        f.seek(0)
        f.truncate()
        f.write(stage)
    if stage == "setup":
        _forget_old(folder, prefix)
