"""A whole deployment on 127.0.0.1: one SuperLink, N SuperNodes, `flwr run` against them.

    python -m simulations.local_federation --nodes 2 --run-config "num-server-rounds=2"

By default it is secured as a real federation would be: the SuperLink serves TLS with a
certificate from a fresh CA (``fedlora certs``), SuperNode authentication is on, and each
SuperNode has its own key pair (``fedlora node-key``), registered with
``flwr supernode register`` before it starts. ``--insecure`` turns both off.

Each SuperNode is a separate process with its own node-config (by default partition i of
the default task's data; ``--data-dir`` gives each site its own ``site<i>.csv``/``.jsonl``)
and its own privacy ledger path. Every process started here is stopped by its PID and
process group when the run ends, fails or is interrupted. Logs, credentials and results
are in ``--workdir``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlora.deploy import make_certificates, make_node_key
from fedlora.secagg.crypto import public_bytes
from fedlora.secagg.identity import generate, load_identity

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

__all__ = ["LocalFederation", "default_node_configs", "free_port", "parse_node_config"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_config_arg(cfg: Mapping[str, Any]) -> str:
    parts = []
    for k, v in cfg.items():
        parts.append(f"{k}={json.dumps(v) if isinstance(v, str) else v}")
    return " ".join(parts)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not open port {port} within {timeout:.0f} s; see {log}")


class LocalFederation:
    """Start a SuperLink and SuperNodes on loopback; stop them all on exit."""

    def __init__(self, workdir: Path, node_configs: Sequence[Mapping[str, Any]],
                 secure: bool = True) -> None:
        self.workdir = Path(workdir).resolve()
        self.node_configs = [dict(c) for c in node_configs]
        self.secure = secure
        self.certs = self.workdir / "certs"
        self.node_ids: dict[int, int] = {}  # SuperNode index -> node id given at registration
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.started_at: dict[str, float] = {}  # process name -> time.monotonic() at spawn
        self.events: dict[str, dict[str, float]] = {}  # name -> event -> seconds after spawn
        self._stopped_groups: set[int] = set()
        self.port = free_port()
        self.flwr_home = self.workdir / "flwr-home"
        self.env = dict(os.environ)
        self.env.update({
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        })

    # -- processes ---------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        f = log.open("ab")
        proc = subprocess.Popen(cmd, cwd=self.workdir, env=self.env, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # own group: stop it and its children
        f.close()
        self.procs.append((name, proc))
        self.started_at[name] = time.monotonic()
        return proc

    def start(self, timeout: float = 60) -> LocalFederation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        connection = f'[superlink.local-deployment]\naddress = "127.0.0.1:{self.port}"\n'
        link_cmd = [str(BIN / "flower-superlink"), "--host", "127.0.0.1",
                    "--port", str(self.port), "--database", str(self.workdir / "superlink.db"),
                    "--disable-runtime-dependency-installation"]
        if self.secure:
            if not (self.certs / "ca.crt").is_file():
                make_certificates(self.certs, ["127.0.0.1", "localhost"])
            connection += f'root-certificates = "{self.certs / "ca.crt"}"\n'
            link_cmd += ["--ssl-ca-certfile", str(self.certs / "ca.crt"),
                         "--ssl-certfile", str(self.certs / "server.crt"),
                         "--ssl-keyfile", str(self.certs / "server.key"),
                         "--enable-supernode-auth"]
        else:
            connection += "insecure = true\n"
            link_cmd.append("--insecure")
        (self.flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "local-deployment"\n\n' + connection)
        link = self._spawn("superlink", link_cmd)
        _wait_port(self.port, link, timeout, "flower-superlink", self.workdir / "superlink.log")
        for i, cfg in enumerate(self.node_configs):
            self.start_node(i, cfg)
        return self

    def node_key(self, i: int) -> Path:
        """SuperNode ``i``'s private key (created on first use; ``.pub`` beside it)."""
        path = self.workdir / "keys" / f"supernode{i}"
        if not path.is_file():
            make_node_key(path, comment=f"supernode{i}")
        return path

    def register(self, i: int) -> int:
        """Register SuperNode ``i``'s public key with the SuperLink; returns its node id."""
        pub = Path(str(self.node_key(i)) + ".pub")
        out = self.flwr("supernode", "register", str(pub), "local-deployment", "--format",
                        "json", timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed: {(out.stdout + out.stderr)[-2000:]}")
        node_id = int(json.loads(out.stdout)["node-id"])
        self.node_ids[i] = node_id
        return node_id

    def start_node(self, i: int, cfg: Mapping[str, Any] | None = None, *,
                   register: bool = True) -> subprocess.Popen:
        """Start SuperNode ``i`` (with TLS and its key when secure; registered first unless
        ``register`` is false, which a SuperLink with authentication must refuse)."""
        cfg = self.node_configs[i] if cfg is None else cfg
        cmd = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
               "--host", "127.0.0.1", "--port", str(free_port()),
               "--node-config", _node_config_arg(cfg)]
        if self.secure:
            if register and i not in self.node_ids:
                self.register(i)
            cmd += ["--root-certificates", str(self.certs / "ca.crt"),
                    "--auth-supernode-private-key", str(self.node_key(i))]
        else:
            cmd.append("--insecure")
        return self._spawn(f"supernode{i}", cmd)

    def log(self, name: str) -> str:
        """The log of process ``name`` (``superlink``, ``supernode0``, ...) so far."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def node_process(self, i: int) -> subprocess.Popen:
        return dict(self.procs)[f"supernode{i}"]

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` and everything it started (a site that crashes or loses
        power: no goodbye to the SuperLink)."""
        proc = self.node_process(i)
        groups = {proc.pid} | self._helper_groups(proc)
        for g in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, signal.SIGKILL)
        self._stopped_groups |= groups
        proc.wait(timeout=10)

    # SuperNode log lines that mark its progress (Flower 1.41's wording), in order: each is
    # looked for after the previous one, so first-reply is the reply to the first training
    # message (the server's identity query comes before it; under secure aggregation the
    # first training message is the setup stage, "train.secagg_setup").
    NODE_EVENTS = {"connected": "SuperNode ID:", "first-message": "Receiving: train",
                   "first-reply": "Sent successfully"}

    def watch(self) -> dict[str, dict[str, float]]:
        """Record, per SuperNode, when each of :attr:`NODE_EVENTS` first appeared in its log
        after the one before it (seconds after the process was spawned; resolution: how
        often this is called)."""
        now = time.monotonic()
        for name in self.started_at:
            if not name.startswith("supernode"):
                continue
            seen = self.events.setdefault(name, {})
            if len(seen) == len(self.NODE_EVENTS):
                continue
            text, pos = self.log(name), 0
            for event, marker in self.NODE_EVENTS.items():
                found = text.find(marker, pos)
                if found < 0:
                    break
                seen.setdefault(event, now - self.started_at[name])
                pos = found + len(marker)
        return self.events

    def _helper_groups(self, only: subprocess.Popen | None = None) -> set[int]:
        # SuperLink and SuperNodes start a SuperExec in a session of its own (it watches
        # --parent-pid); stop those groups too rather than wait for them to notice.
        groups = set()
        for _, proc in self.procs:
            if only is not None and proc is not only:
                continue
            out = subprocess.run(["pgrep", "-f", f"flower-superexec.*--parent-pid {proc.pid}"],
                                 capture_output=True, text=True).stdout
            for pid in out.split():
                with contextlib.suppress(ProcessLookupError):
                    groups.add(os.getpgid(int(pid)))
        return groups

    def alive_groups(self) -> set[int]:
        """Process groups started here that still hold a live (non-zombie) process."""
        alive = set()
        for g in {proc.pid for _, proc in self.procs} | self._stopped_groups:
            out = subprocess.run(["ps", "-o", "stat=", "-g", str(g)], capture_output=True,
                                 text=True).stdout.split()
            if any(not stat.startswith("Z") for stat in out):
                alive.add(g)
        return alive

    def stop(self) -> None:
        """SIGTERM every process group started here, then SIGKILL what is left, and wait."""
        groups = {proc.pid for _, proc in self.procs} | self._helper_groups()
        self._stopped_groups |= groups
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for g in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(g, sig)
            deadline = time.monotonic() + wait
            for _, proc in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            while self.alive_groups() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.alive_groups():
                break

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- flwr commands -----------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def start_run(self, run_config: str) -> subprocess.Popen:
        """``flwr run . local-deployment --stream`` in the background (output to ``run.log``)."""
        log = (self.workdir / "run.log").open("wb")
        proc = subprocess.Popen(
            [str(BIN / "flwr"), "run", ".", "local-deployment", "--stream", "--run-config",
             run_config], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.append(("flwr-run", proc))
        self.started_at["flwr-run"] = time.monotonic()
        return proc

    def run(self, run_config: str, timeout: float = 900,
            on_poll=None) -> subprocess.CompletedProcess:
        """Run ``flwr run`` to the end, watching the SuperNodes' logs meanwhile.

        ``on_poll(self)`` is called every 0.2 s while the run goes on (tests use it to act
        mid-run). The returned ``stdout`` is the streamed log of the run.
        """
        proc = self.start_run(run_config)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise subprocess.TimeoutExpired(proc.args, timeout, output=self.log("run"))
            self.watch()
            if on_poll is not None:
                on_poll(self)
            time.sleep(0.2)
        self.watch()
        return subprocess.CompletedProcess(proc.args, proc.returncode, self.log("run"), "")

    def runs(self) -> list[dict[str, Any]]:
        out = self.flwr("ls", "local-deployment", "--format", "json", timeout=60)
        return json.loads(out.stdout).get("runs", [])


def parse_node_config(text: str) -> dict[str, Any]:
    """``"KEY=VALUE ..."`` as SuperNode ``--node-config`` reads it: numbers as numbers,
    quoted or bare text as strings. A token without ``=`` is refused, naming it."""
    out: dict[str, Any] = {}
    for token in shlex.split(text):
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise SystemExit(f"--node-config: expected KEY=VALUE, got {token!r}")
        for kind in (int, float):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def default_node_configs(n: int, workdir: Path, data_dir: Path | None,
                         extra: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each site's node-config: partition i of the packaged data (or ``site<i>.*`` in
    ``data_dir``), its own ledger file, its pinned secure-aggregation identity and the
    federation's (``secagg-identity``, ``secagg-peers``), and ``extra`` (e.g. the site's
    privacy policy)."""
    configs, keys = [], [workdir / f"site{i}" / "secagg-identity.key" for i in range(n)]
    for key in keys:
        key.parent.mkdir(parents=True, exist_ok=True)
    public = [public_bytes(load_identity(k)).hex() if k.exists() else generate(k) for k in keys]
    peers = workdir / "secagg-peers.txt"
    peers.write_text("".join(f"{p}\n" for p in public))
    for i in range(n):
        cfg: dict[str, Any] = {"privacy-state-path": str(workdir / f"site{i}" / "privacy.json"),
                               "secagg-identity": str(keys[i]), "secagg-peers": str(peers),
                               **dict(extra or {})}
        if data_dir is not None:
            found = sorted(Path(data_dir).glob(f"site{i}.*"))
            if not found:
                raise SystemExit(f"no data file site{i}.csv/.jsonl in {data_dir}")
            cfg["data-path"] = str(found[0])
        else:
            cfg.update({"partition-id": i, "num-partitions": n})
        (workdir / f"site{i}").mkdir(parents=True, exist_ok=True)
        configs.append(cfg)
    return configs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--run-config", default="num-server-rounds=2")
    ap.add_argument("--workdir", type=Path, default=ROOT / "results" / "local-federation")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="folder with site0.csv, site1.csv, ... (one file per SuperNode)")
    ap.add_argument("--node-config", default="",
                    help="node-config entries for every site, e.g. \"accept-dp-modes='sample' "
                         "max-epsilon=8 max-delta=1e-5\" (the site's privacy policy)")
    ap.add_argument("--insecure", action="store_true",
                    help="no TLS and no SuperNode authentication (loopback experiments only)")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    configs = default_node_configs(args.nodes, args.workdir, args.data_dir,
                                   parse_node_config(args.node_config))
    run_config = args.run_config
    if "output-dir" not in run_config:
        run_config += f" output-dir='{args.workdir / 'results'}'"
    # Stop everything on Ctrl-C or kill, also when started where SIGINT is ignored (a
    # background job of a script): the with-block below stops every process it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    with LocalFederation(args.workdir, configs, secure=not args.insecure) as fed:
        how = "insecure" if args.insecure else "TLS + SuperNode authentication"
        print(f"SuperLink on 127.0.0.1:{fed.port} ({how}), {args.nodes} SuperNodes "
              f"{fed.node_ids or ''}; logs and credentials in {args.workdir}", flush=True)
        t0 = time.monotonic()
        proc = fed.run(run_config)
        sys.stdout.write(proc.stdout)
        print(f"\nrun finished in {time.monotonic() - t0:.1f} s (exit code {proc.returncode})")
        for name, ev in sorted(fed.events.items()):
            print(f"{name}: " + ", ".join(f"{k} after {v:.1f} s" for k, v in ev.items()))
        return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
