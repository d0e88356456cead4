"""The stages of a secure round a node has taken, recorded outside Flower's node state.

Flower hands each message a copy of the node state and keeps the copy the handler
returns: a deployed SuperNode runs each message in a ``flwr-clientapp`` process of its
own, and a simulation in whichever backend worker is free. Two stage messages delivered at
once then each read the state as it was before either ran, and a lock inside the handler
(:mod:`fedlora.app.client.round_lock`) cannot order them. So a node also records which
stage of each round it has taken, in a file of its own locked with ``fcntl.flock`` while it
is read and written: :func:`take` lets a stage through once, and only right after the one
before it (setup first). A second copy of a stage, or a stage whose predecessor was never
taken here, is refused whatever the copy of the node state it was handed says. The
masked input in particular is sent once per round: a second one under the same masks
would hand the server the difference of two updates.

A round's file is named by the run, the node and the digest of the round config, and
holds the name of the last stage taken (no secret). The record is only as good as its
folder, so :func:`folder_for` keeps it where no one else can write: next to the site's
privacy ledger (``<privacy-state-path>.secagg-stages``) when its node-config names one,
else in a folder of the user's own (``$XDG_RUNTIME_DIR``, else the system's temporary
directory, named by the uid). The folder must be a real directory, owned by the user,
with mode ``0700``: anything else (a symbolic link, a folder another user made or can
write) is refused naming the path. Files are opened relative to the folder without
following links and must be regular files of the user's; what a file holds is never
repeated in a message (a file that holds anything but a stage name is refused as
damaged). Files a day old are removed when the node sets up a new round of the same run.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context

from fedlora.secagg import ProtocolError

__all__ = ["ORDER", "folder_for", "take"]

log = logging.getLogger("fedlora.client")

#: The stages of a round, in the order a node takes them.
ORDER = ("setup", "advertise", "share_keys", "masked_input", "consistency", "unmask")
#: Files of rounds older than this (seconds) are removed at a new setup.
MAX_AGE_S = 86400.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK


def folder_for(node_config: Mapping[str, Any]) -> Path:
    """Where this node keeps its record: beside its privacy ledger when it has one, else
    in a folder of the user's own."""
    ledger = node_config.get("privacy-state-path")
    if ledger:
        return Path(f"{ledger}.secagg-stages")
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and os.path.isabs(runtime_dir):
        return Path(runtime_dir) / "fedlora-secagg-stages"
    return Path(tempfile.gettempdir()) / f"fedlora-secagg-stages-{os.getuid()}"


def _refuse(path: Path, why: str) -> ProtocolError:
    log.error("Secure aggregation: the record of stages taken at %s %s", path, why)
    return ProtocolError(f"this node cannot keep its record of the stages it takes in "
                         f"{path}: it {why} (it must be a directory of this user's, "
                         "mode 0700)")


def _open_folder(folder: Path) -> int:
    """A descriptor of ``folder`` (made if missing), checked to be the user's own."""
    try:
        folder.mkdir(mode=0o700, parents=False)
        os.chmod(folder, 0o700, follow_symlinks=False)
    except FileExistsError:
        pass
    except OSError as e:
        raise _refuse(folder, f"cannot be made ({e.strerror})") from None
    try:
        fd = os.open(folder, _DIR_FLAGS)
    except OSError as e:
        raise _refuse(folder, f"cannot be opened as a directory ({e.strerror})") from None
    info = os.fstat(fd)
    why = ("is owned by another user" if info.st_uid != os.getuid() else
           f"has mode {stat.S_IMODE(info.st_mode):04o}"
           if stat.S_IMODE(info.st_mode) != 0o700 else None)
    if why is not None:
        os.close(fd)
        raise _refuse(folder, why)
    return fd


def _open_record(folder: Path, dir_fd: int, name: str) -> int:
    try:
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=dir_fd)
    except OSError as e:
        raise _refuse(folder / name, f"cannot be opened ({e.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_nlink != 1:
        os.close(fd)
        raise _refuse(folder / name, "is not a plain file of this user's")
    os.set_blocking(fd, True)
    return fd


def _forget_old(dir_fd: int, prefix: str) -> None:
    now = time.time()
    for name in os.listdir(dir_fd):
        if not name.startswith(prefix):
            continue
        with contextlib.suppress(OSError):  # another process removed it first
            if now - os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime > MAX_AGE_S:
                os.unlink(name, dir_fd=dir_fd)


def take(context: Context, digest: bytes, stage: str) -> None:
    """Record that this node takes ``stage`` of the round whose config has ``digest``;
    ``ProtocolError`` when it took that stage already or not the one before it, or when
    its record cannot be kept where no one else can change it."""
    if stage not in ORDER:
        raise ValueError(f"unknown stage {stage!r}; stages are {ORDER}")
    before = "" if stage == "setup" else ORDER[ORDER.index(stage) - 1]
    prefix = f"{int(context.run_id)}-{int(context.node_id)}-"
    folder = folder_for(context.node_config)
    dir_fd = _open_folder(folder)
    try:
        with os.fdopen(_open_record(folder, dir_fd, prefix + digest.hex()), "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
            taken = f.read(64).strip()
            if taken not in ("", *ORDER):
                raise _refuse(folder / (prefix + digest.hex()), "holds no stage name")
            if taken != before:
                raise ProtocolError(
                    f"this node cannot take stage {stage!r} of this round: its last stage "
                    f"taken is {taken or 'none'!r} (a copy delivered twice, or out of order)")
            f.seek(0)
            f.truncate()
            f.write(stage)
            f.flush()
            os.fsync(f.fileno())
        if stage == "setup":
            _forget_old(dir_fd, prefix)
    finally:
        os.close(dir_fd)
