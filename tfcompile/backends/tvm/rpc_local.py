"""A TVM RPC tracker and servers on this machine, for tests and for trying ``--remote`` out.

``local_rpc(servers=2, key="local")`` starts TVM's own tracker and servers as
subprocesses on 127.0.0.1 (``python -m tvm.exec.rpc_tracker`` and
``python -m tvm.exec.rpc_server``, exactly what one runs on a real device),
waits until every server has registered with the tracker, yields a
``LocalRpc`` whose ``remote`` is the ``RemoteSpec`` to measure through, and
always stops them: each runs in its own process group (the tracker and the
servers fork workers and per-session processes), which is terminated, then
killed if it lingers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from tfcompile.backends.tvm.remote import RemoteError, RemoteSpec, tracker_summary


@dataclasses.dataclass
class LocalRpc:
    remote: RemoteSpec
    processes: list[subprocess.Popen]  # tracker first, then the servers
    log_dir: Path
    servers: int
    start_timeout_s: float = 60.0

    def wait_ready(self) -> "LocalRpc":
        """Block until every server has registered with the tracker (RemoteError on failure or timeout)."""
        _wait_until_registered(self.remote, self.processes, self.servers, self.log_dir, self.start_timeout_s)
        return self

    def group_pids(self) -> set[int]:
        """Every live process these started (leaders and their children)."""
        import psutil

        pids = set()
        for proc in self.processes:
            try:
                leader = psutil.Process(proc.pid)
                pids.add(leader.pid)
                pids.update(child.pid for child in leader.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return pids


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def _stop(processes: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    for proc in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in processes:
        # Children (TVM's popen workers, per-session processes) share the leader's group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def local_rpc(servers: int = 2, key: str = "local", *, host: str = "127.0.0.1", threads: int | None = None,
              start_timeout_s: float = 60.0, wait: bool = True) -> Iterator[LocalRpc]:
    """Start a tracker and ``servers`` RPC servers with ``key``; stop them all on exit.

    ``threads`` sets ``TVM_NUM_THREADS`` for the servers (the thread pool each
    measurement runs on); by default they inherit this process's setting.
    With ``wait=False`` the block starts at once (the processes start in the
    background) and ``wait_ready()`` waits for the servers later.
    """
    env = dict(os.environ)
    if threads is not None:
        env["TVM_NUM_THREADS"] = str(threads)
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="tfcompile-rpc-local-") as tmp:
        log_dir = Path(tmp)
        try:
            port = free_port(host)
            processes.append(_start(["tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
                                     "--port-end", str(port + 1), "--silent"], log_dir / "tracker.log", env))
            for i in range(servers):
                server_port = free_port(host)
                processes.append(_start(["tvm.exec.rpc_server", "--host", host, "--port", str(server_port),
                                         "--port-end", str(server_port + 100), "--tracker", f"{host}:{port}",
                                         "--key", key, "--silent"], log_dir / f"server{i}.log", env))
            rpc = LocalRpc(RemoteSpec(host, port, key), processes, log_dir, servers, start_timeout_s)
            yield rpc.wait_ready() if wait else rpc
        finally:
            _stop(processes)


def _wait_until_registered(remote: RemoteSpec, processes, servers: int, log_dir: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        for proc, log in zip(processes, ["tracker.log"] + [f"server{i}.log" for i in range(servers)]):
            if proc.poll() is not None:
                raise RemoteError(f"local TVM RPC {log.removesuffix('.log')} exited ({proc.returncode}): "
                                  f"{_tail(log_dir / log)}")
        try:
            summary = tracker_summary(remote, timeout=2.0)
            registered = sum(str(s.get("key")) == f"server:{remote.key}" for s in summary.get("server_info", []))
            if registered >= servers:
                return
            last = f"{registered} of {servers} servers registered"
        except RemoteError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise RemoteError(f"local TVM RPC tracker and servers did not come up within {timeout_s:.0f} s: {last}")
