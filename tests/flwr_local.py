"""Run `flwr run .` against a private local SuperLink and always stop what it started."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCAL_HEALTH = "http://127.0.0.1:39093/health"


def superlink_reachable() -> bool:
    try:
        with urllib.request.urlopen(LOCAL_HEALTH, timeout=1) as r:  # loopback only
            return r.status == 200
    except OSError:
        return False


def flwr_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    return env


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def stop_local_superlink(flwr_home: Path) -> list[int]:
    """Stop, by PID, the SuperLink started for ``flwr_home`` and its process groups."""
    links = _pids(f"flower-superlink.*{flwr_home}/local-superlink")
    groups = set()
    for pid in links:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
        for ex in _pids(f"flower-superexec.*--parent-pid {pid}"):
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(ex))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive_group(g) for g in groups):
            time.sleep(0.2)
    return links


def _alive_group(pgid: int) -> bool:
    return bool(subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).stdout.strip())


#: Held while a test runs `flwr run` against the local SuperLink (its ports are fixed): a
#: test in another pytest-xdist worker, or another pytest session, waits for it.
LOCK = Path(tempfile.gettempdir()) / f"fedlora-local-superlink-{os.getuid()}.lock"


@contextlib.contextmanager
def local_flwr(flwr_home: Path):
    """Environment for `flwr run` with a private FLWR_HOME; stops its SuperLink on exit.
    One at a time on this machine (:data:`LOCK`)."""
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if superlink_reachable():
            raise RuntimeError("another local SuperLink already listens on 127.0.0.1:39093; "
                               "stop it first (bash scripts/stop-superlink.sh)")
        try:
            yield flwr_env(flwr_home)
        finally:
            stop_local_superlink(flwr_home)


def flwr_run(env: dict[str, str], run_config: str, num_supernodes: int, timeout: float):
    cmd = [str(BIN / "flwr"), "run", ".", "--stream",
           "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
           "--run-config", run_config]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
