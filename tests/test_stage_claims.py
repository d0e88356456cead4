"""A site's record of the secure-round stages it took, against another local user and a
server working together: the record's folder and files are the site's own or refused, no
file is followed through a link or read back into a message, and the masked input of a
round cannot be claimed twice by resetting the record."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import types
from pathlib import Path

import pytest

from fedlora.app.client import stage_claims
from fedlora.app.client.stage_claims import folder_for, take
from fedlora.secagg import ProtocolError

NOBODY = 65534  # the other local user
SECRET = "ed25519-private-key-hex-0123456789"
STAGES = ("setup", "advertise", "share_keys", "masked_input")


@pytest.fixture()
def shared_tmp(monkeypatch):
    """A system temporary directory anyone can write in (as ``/tmp``)."""
    base = Path(tempfile.mkdtemp(prefix="fedlora-shared-tmp-", dir="/tmp"))
    os.chmod(base, 0o1777)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _user_folder():
    """The folder a site without a privacy ledger keeps its record in."""
    return Path(tempfile.gettempdir()) / f"fedlora-secagg-stages-{os.getuid()}"


def _context(**node_config):
    return types.SimpleNamespace(run_id=7, node_id=42, node_config=node_config)


def _as_other_user(fn):
    """Run ``fn`` in a child process as another user."""
    if os.getuid() != 0:
        pytest.skip("playing another local user needs root")
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0


def _secret(path):
    path.write_text(SECRET)
    os.chmod(path, 0o600)
    return path


def test_a_folder_another_user_made_is_refused_and_no_link_is_followed(shared_tmp):
    """The attacker makes the folder first and links the round's file to the site's key:
    the site refuses (naming the folder) and the key is neither sent nor changed."""
    ctx, digest = _context(), bytes.fromhex("ab" * 32)
    secret = _secret(shared_tmp / "identity.key")
    folder = _user_folder()
    name = f"7-42-{digest.hex()}"

    def plant():
        os.mkdir(folder, 0o777)
        os.chmod(folder, 0o777)
        os.symlink(secret, folder / name)

    _as_other_user(plant)
    with pytest.raises(ProtocolError) as info:
        take(ctx, digest, "setup")
    assert str(folder) in str(info.value) and "another user" in str(info.value)
    assert SECRET not in str(info.value) and secret.read_text() == SECRET


def test_a_local_user_cannot_reset_the_claim_on_the_masked_input(shared_tmp):
    """The second masked input of a round (y1 - y2 = x1 - x2 to the server) needs the claim
    reset; a folder the attacker owns is refused, so no stage is taken there at all."""
    ctx, digest = _context(), bytes.fromhex("cd" * 32)
    folder = _user_folder()
    _as_other_user(lambda: (os.mkdir(folder, 0o777), os.chmod(folder, 0o777)))
    taken = []

    def claim(stage):
        try:
            take(ctx, digest, stage)
            taken.append(stage)
        except ProtocolError:
            pass

    for stage in STAGES:
        claim(stage)

    def reset():  # the attacker owns the folder: it replaces the round's file
        path = folder / f"7-42-{digest.hex()}"
        if path.exists():
            path.unlink()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
            os.write(fd, b"share_keys")
            os.close(fd)

    _as_other_user(reset)
    claim("masked_input")
    assert taken.count("masked_input") <= 1
    assert folder_for({}) == folder


def test_the_masked_input_is_claimed_once_in_a_folder_of_the_sites(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    ledger = tmp_path / "site" / "ledger.json"
    ledger.parent.mkdir()
    ctx, digest = _context(**{"privacy-state-path": str(ledger)}), b"\x01" * 32
    for s in STAGES:
        take(ctx, digest, s)
    folder = folder_for(ctx.node_config)
    assert folder == tmp_path / "site" / "ledger.json.secagg-stages"
    info = os.lstat(folder)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    with pytest.raises(ProtocolError, match="last stage taken is 'masked_input'"):
        take(ctx, digest, "masked_input")


def test_a_folder_anyone_can_write_is_refused(tmp_path):
    folder = tmp_path / "x.secagg-stages"
    folder.mkdir()
    os.chmod(folder, 0o777)
    ctx = _context(**{"privacy-state-path": str(tmp_path / "x")})
    with pytest.raises(ProtocolError, match="mode 0777"):
        take(ctx, b"\x02" * 32, "setup")


def test_a_linked_folder_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, tmp_path / "x.secagg-stages")
    ctx = _context(**{"privacy-state-path": str(tmp_path / "x")})
    with pytest.raises(ProtocolError, match="cannot be opened as a directory"):
        take(ctx, b"\x03" * 32, "setup")
    assert os.listdir(real) == []


@pytest.mark.parametrize("plant", ["symlink", "fifo", "garbage"])
def test_a_record_that_is_not_a_plain_stage_file_is_refused_without_its_contents(
        tmp_path, plant):
    ctx, digest = _context(**{"privacy-state-path": str(tmp_path / "x")}), b"\x04" * 32
    take(ctx, b"\x05" * 32, "setup")  # makes the folder
    path = folder_for(ctx.node_config) / f"7-42-{digest.hex()}"
    secret = _secret(tmp_path / "identity.key")
    if plant == "symlink":
        os.symlink(secret, path)
    elif plant == "fifo":
        os.mkfifo(path, 0o600)
    else:
        path.write_text(SECRET)
    with pytest.raises(ProtocolError) as info:
        take(ctx, digest, "setup")
    assert SECRET not in str(info.value) and str(path) in str(info.value)
    assert secret.read_text() == SECRET


def test_stage_names_only(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        take(_context(**{"privacy-state-path": str(tmp_path / "x")}), b"\x06" * 32, "steal")
    assert stage_claims.ORDER[3] == "masked_input"
