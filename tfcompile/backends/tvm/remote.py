"""Measure compiled variants on another machine through TVM's RPC tracker and servers.

The device being measured runs TVM's own RPC server (``python -m
tvm.exec.rpc_server --tracker HOST:PORT --key KEY``) registered with a TVM
RPC tracker (``python -m tvm.exec.rpc_tracker``); nothing here speaks a
protocol of its own. For each variant tfcompile compiles the graph with TVM
for the remote's target on this machine, exports the Relax executable as a
shared library, asks the tracker for a session on a server with the device
key, uploads the library, loads it in a Relax VM on the remote device, checks
its outputs, and times it there with the VM's ``time_evaluator`` (the timer
runs on the remote; network time is not in the figure). The figure follows
the project's convention: the median of ``repeat`` timed runs after warm-up
(one run to fetch the outputs, one discarded by the evaluator).

``measure_many`` dispatches several variants at once, one thread per server
with the key: each thread requests its own session, and the tracker queues
the requests per key and hands each free server to the next one.

Errors a user can cause (tracker unreachable, no server with the key, a
queue that never frees up) are ``RemoteError``s with one-line messages, and
every wait has a time limit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import os
import socket
import statistics
import struct
import threading
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from tfcompile.backends.tvm import flatten_outputs
from tfcompile.backends.timing import Measurement
from tfcompile.errors import BackendError, TfcompileError, first_line
from tfcompile.graph import ModelGraph

CONNECT_TIMEOUT_S = 10.0  # reaching the tracker or a server
QUEUE_TIMEOUT_S = 300.0  # waiting in the tracker's queue for a free server
SERVER_HANDSHAKE_TIMEOUT_S = 30.0  # a server the tracker assigned must answer within this
SESSION_TIMEOUT_S = 900.0  # the server ends a session that runs longer than this

__all__ = ["RemoteError", "RemoteResult", "RemoteSpec", "RemoteArtifact", "export_module", "measure_artifacts",
           "measure_many", "measure_local", "remote_target", "servers_for",
           "tracker_summary"]


class RemoteError(BackendError):
    """The RPC tracker or a remote server could not be reached or used."""


@dataclasses.dataclass(frozen=True)
class RemoteSpec:
    """A device reached through a TVM RPC tracker: tracker address and the servers' device key."""

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, address: str, key: str | None) -> "RemoteSpec":
        """``address`` is "HOST:PORT" of the tracker (IPv6 hosts in brackets: "[::1]:9190")."""
        host, sep, port_text = (address or "").strip().rpartition(":")
        host = host.strip("[]")
        # ASCII digits only: int() would also take "+9190", "9_190" and other scripts' digits.
        port = int(port_text) if port_text.isascii() and port_text.isdigit() else -1
        if not sep or not host or any(c.isspace() for c in host) or not 0 < port < 65536:
            raise TfcompileError(f"--remote {address!r}: expected HOST:PORT of a TVM RPC tracker, "
                                 "e.g. 192.168.1.20:9190")
        if not key or not key.strip():
            raise TfcompileError("--remote needs --device-key: the key the device's RPC servers registered "
                                 "with (python -m tvm.exec.rpc_server --key KEY)")
        return cls(host, port, key.strip())

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def label(self) -> str:
        """How reports name the backend: ``tvm@KEY``."""
        return f"tvm@{self.key}"

    def __str__(self) -> str:
        return f"key {self.key!r} on tracker {self.address}"


# --- the tracker --------------------------------------------------------------------------------------------------

def _tracker_socket(remote: RemoteSpec, timeout: float) -> socket.socket:
    from tvm.rpc import base

    try:
        sock = socket.create_connection((remote.host, remote.port), timeout=timeout)
    except OSError as exc:
        raise RemoteError(f"cannot reach the TVM RPC tracker at {remote.address}: {first_line(exc)} "
                          "(start one with `python -m tvm.exec.rpc_tracker --port PORT`)") from exc
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except (OSError, RuntimeError, struct.error) as exc:
        sock.close()
        raise RemoteError(f"{remote.address} does not answer as a TVM RPC tracker: {first_line(exc)}") from exc
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise RemoteError(f"{remote.address} is not a TVM RPC tracker")
    return sock


def tracker_summary(remote: RemoteSpec, *, timeout: float | None = None) -> dict:
    """The tracker's own summary: ``{"server_info": [...], "queue_info": {...}}``.

    A tracker that accepts and never answers fails after ``timeout`` (default ``CONNECT_TIMEOUT_S``).
    """
    from tvm.rpc import base

    sock = _tracker_socket(remote, CONNECT_TIMEOUT_S if timeout is None else timeout)
    try:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        value = base.recvjson(sock)
    except (OSError, RuntimeError, ValueError) as exc:
        raise RemoteError(f"TVM RPC tracker at {remote.address}: summary failed: {first_line(exc)}") from exc
    finally:
        sock.close()
    servers = value[1].get("server_info", []) if _is_reply(value, dict) else None
    if not isinstance(servers, list) or not all(_is_server_info(info) for info in servers):
        raise RemoteError(f"{remote.address} does not answer as a TVM RPC tracker: unexpected summary "
                          f"{_clip(value)}")
    return value[1]


def _is_reply(value, payload_type) -> bool:
    """A tracker's answer: [TrackerCode.SUCCESS, payload]."""
    from tvm.rpc import base

    return (isinstance(value, list) and len(value) == 2 and type(value[0]) is int
            and value[0] == base.TrackerCode.SUCCESS and isinstance(value[1], payload_type))


def _is_server_info(info) -> bool:
    addr = info.get("addr") if isinstance(info, dict) else None
    return (isinstance(info, dict) and isinstance(info.get("key", ""), str)
            and (addr is None or (isinstance(addr, list) and len(addr) == 2)))


def _clip(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def servers_for(remote: RemoteSpec, *, timeout: float | None = None) -> list[str]:
    """Addresses of the servers registered with the remote's key; RemoteError if there are none."""
    summary = tracker_summary(remote, timeout=timeout)
    servers, keys = [], set()
    for info in summary.get("server_info", []):
        key = info.get("key", "").removeprefix("server:")
        keys.add(key)
        if key == remote.key:
            addr = info.get("addr") or ["?", "?"]
            servers.append(f"{addr[0]}:{addr[1]}")
    if not servers:
        known = ", ".join(sorted(keys)) or "none"
        raise RemoteError(f"no TVM RPC server with key {remote.key!r} is registered at the tracker "
                          f"{remote.address} (keys there: {known}); start one on the device with "
                          f"`python -m tvm.exec.rpc_server --tracker {remote.address} --key {remote.key}`")
    return servers


def _request_session(remote: RemoteSpec, *, queue_timeout: float, session_timeout: float):
    """A session on the next free server with the key, and that server's address.

    The same request as ``tvm.rpc.TrackerSession.request``, with a time limit on
    the wait in the tracker's queue and the server's address returned.
    """
    from tvm import rpc
    from tvm.rpc import base

    sock = _tracker_socket(remote, CONNECT_TIMEOUT_S)
    try:
        sock.settimeout(queue_timeout)
        base.sendjson(sock, [base.TrackerCode.REQUEST, remote.key, "", 1])
        value = base.recvjson(sock)
    except TimeoutError as exc:
        raise RemoteError(f"no TVM RPC server with key {remote.key!r} became free at {remote.address} within "
                          f"{queue_timeout:.0f} s") from exc
    except (OSError, RuntimeError, ValueError) as exc:
        raise RemoteError(f"TVM RPC tracker at {remote.address}: request failed: {first_line(exc)}") from exc
    finally:
        sock.close()  # the tracker drops our request, if still queued, when this connection closes
    if not _is_reply(value, list) or len(value[1]) != 3 or not isinstance(value[1][0], str) \
            or type(value[1][1]) is not int or not isinstance(value[1][2], str):
        raise RemoteError(f"TVM RPC tracker at {remote.address}: request for {remote.key!r} refused: "
                          f"{_clip(value)}")
    url, port, matchkey = value[1]
    session = _connect_within(lambda: rpc.connect(url, port, matchkey, session_timeout=int(session_timeout)),
                              SERVER_HANDSHAKE_TIMEOUT_S, f"the RPC server {url}:{port} ({remote.key!r})")
    return session, f"{url}:{port}"


def _connect_within(connect, timeout_s: float, what: str):
    """``connect()`` or a RemoteError after ``timeout_s``: TVM's own connect has no time limit, and a server
    that accepts and never answers would hold the run forever. The waiting thread is a daemon, so an
    abandoned connect does not keep the process alive."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["session"] = connect()
        except Exception as exc:  # noqa: BLE001 - reported below, in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="tvm-rpc-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RemoteError(f"{what} did not answer within {timeout_s:.0f} s")
    if "error" in outcome:
        raise RemoteError(f"cannot open a session on {what}: {first_line(outcome['error'])}") from outcome["error"]
    return outcome["session"]


# --- compile and export for the remote ---------------------------------------------------------------------------

def remote_target(target_name: str | None):
    """(TVM target, cross compiler) for measuring the device spec ``target_name`` remotely.

    A device spec may carry a ``[tvm]`` table: ``target`` (a TVM target string or
    inline table, e.g. ``{kind = "llvm", mtriple = "aarch64-linux-gnu", mcpu =
    "cortex-a78"}``) and ``cc`` (the cross compiler that links the exported
    library, e.g. ``"aarch64-linux-gnu-g++"``). Without it the remote is taken to
    be the same kind of CPU as this host: this host's target and compiler.
    """
    from tfcompile.backends.tvm import as_target, host_target

    table, kind = {}, "cpu"
    if target_name:
        from tfcompile.cost_models.device import device_file, load_device

        kind = load_device(target_name).kind  # unknown names fail with the list of known ones
        with device_file(target_name).open("rb") as f:
            table = tomllib.load(f).get("tvm", {})
    if "target" not in table:
        if kind != "cpu":
            raise TfcompileError(f"target {target_name!r} is a {kind} and its device spec names no TVM target "
                                 "([tvm] target = ...): tfcompile can only measure CPUs like this host remotely")
        return host_target(), table.get("cc")
    return as_target(table["target"]), table.get("cc")


def export_module(module, path: str | os.PathLike, *, cross_compiler: str | None = None) -> Path:
    """Export a compiled ``TvmModule``'s Relax executable as a shared library at ``path``."""
    path = Path(path)
    kwargs = {}
    if cross_compiler:
        from tvm.contrib import cc

        kwargs["fcompile"] = cc.cross_compiler(cross_compiler)
    try:
        # The executable's export_library keeps TVM's "Scope Saving" lines out of the terminal (native_log).
        module.executable.export_library(str(path), **kwargs)
    except Exception as exc:
        raise BackendError(f"tvm: {module.name}: export for the remote failed: {first_line(exc)}") from exc
    return path


@dataclasses.dataclass(frozen=True)
class RemoteArtifact:
    """A variant compiled and exported for the remote, with the inputs to time it on."""

    name: str
    library: Path
    inputs: tuple[torch.Tensor, ...]
    device_type: str = "cpu"  # the TVM device the library runs on: "cpu" for llvm, "cuda", ...


@dataclasses.dataclass(frozen=True)
class RemoteResult:
    name: str
    measurement: Measurement
    outputs: tuple[torch.Tensor, ...]
    server: str  # the RPC server that measured it
    started_s: float  # time.monotonic() on this machine when its session began and ended
    ended_s: float


def _device_type(target) -> str:
    kind = getattr(getattr(target, "kind", None), "name", "llvm")
    return {"llvm": "cpu", "c": "cpu"}.get(kind, kind)


def _time_vm(vm, device, args, *, repeat: int, number: int) -> tuple[Measurement, tuple[torch.Tensor, ...]]:
    """Outputs of one run, then the median of ``repeat`` timed runs (each the mean of ``number`` calls)."""
    vm.set_input("main", *args)
    vm.invoke_stateful("main")
    outputs = tuple(torch.from_numpy(o.numpy()) for o in flatten_outputs(vm.get_outputs("main")))
    # The evaluator runs once untimed (warm-up), then ``repeat`` x ``number`` timed calls, timed where it runs.
    timer = vm.time_evaluator("invoke_stateful", device, number=number, repeat=repeat)
    samples = tuple(float(s) for s in timer("main").results)
    return Measurement("tvm", statistics.median(samples), samples), outputs


def measure_local(module, inputs: tuple[torch.Tensor, ...], *, repeat: int = 10,
                  number: int = 1) -> Measurement:
    """Time a compiled ``TvmModule`` in this process exactly as the remote path times it."""
    import tvm
    from tvm import relax

    device = tvm.cpu()
    vm = relax.VirtualMachine(module.executable, device)
    args = [tvm.runtime.tensor(t.detach().contiguous().cpu().numpy(), device) for t in inputs]
    return _time_vm(vm, device, args, repeat=repeat, number=number)[0]


def _measure_on_session(session, artifact: RemoteArtifact, *, repeat: int, number: int):
    import tvm
    from tvm import relax

    remote_name = f"{artifact.library.stem}-{os.getpid()}-{time.monotonic_ns()}.so"
    session.upload(str(artifact.library), target=remote_name)
    library = session.load_module(remote_name)
    device = session.device(artifact.device_type, 0)
    vm = relax.VirtualMachine(library, device)
    args = [tvm.runtime.tensor(t.detach().contiguous().cpu().numpy(), device) for t in artifact.inputs]
    try:
        return _time_vm(vm, device, args, repeat=repeat, number=number)
    finally:
        del args, vm, library
        with contextlib.suppress(Exception):
            session.remove(remote_name)


def measure_artifacts(artifacts: Iterable[RemoteArtifact], remote: RemoteSpec, *, repeat: int = 10,
                      number: int = 1, workers: int | None = None, queue_timeout: float = QUEUE_TIMEOUT_S,
                      session_timeout: float = SESSION_TIMEOUT_S,
                      progress: Callable[[str], None] = lambda _: None) -> dict[str, RemoteResult]:
    """Time exported variants on the remote, ``workers`` at a time (default: one per server with the key)."""
    artifacts = list(artifacts)
    servers = servers_for(remote)  # fails fast when the tracker is unreachable or nobody has the key
    workers = max(1, min(len(artifacts), workers or len(servers)))

    def one(artifact: RemoteArtifact) -> RemoteResult:
        started = time.monotonic()
        session, server = _request_session(remote, queue_timeout=queue_timeout, session_timeout=session_timeout)
        progress(f"measuring {artifact.name} on {remote.key} ({server})")
        try:
            measurement, outputs = _measure_on_session(session, artifact, repeat=repeat, number=number)
        except RemoteError:
            raise
        except Exception as exc:
            raise RemoteError(f"{artifact.name}: run on the RPC server {server} ({remote.key!r}) failed: "
                              f"{first_line(exc)}") from exc
        finally:
            # The connection closes when the last handle to the session goes; the VM's
            # closures keep reference cycles, so collect them now rather than at some later GC.
            del session
            gc.collect()
        measurement = dataclasses.replace(measurement, backend=remote.label)
        return RemoteResult(artifact.name, measurement, outputs, server, started, time.monotonic())

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tvm-rpc")
    done = False
    try:
        futures = {a.name: pool.submit(one, a) for a in artifacts}
        results = {name: future.result() for name, future in futures.items()}
        done = True
        return results
    finally:
        # On an error (or Ctrl-C) drop the variants not yet dispatched and do not wait for the others.
        pool.shutdown(wait=done, cancel_futures=not done)


def measure_many(graphs: Iterable[ModelGraph] | Mapping[str, ModelGraph], remote: RemoteSpec, *, repeat: int = 10,
                 number: int = 1,
                 target=None, cross_compiler: str | None = None, schedule: str = "rules",
                 workdir: str | os.PathLike | None = None, queue_timeout: float = QUEUE_TIMEOUT_S,
                 session_timeout: float = SESSION_TIMEOUT_S,
                 progress: Callable[[str], None] = lambda _: None) -> dict[str, RemoteResult]:
    """Compile each graph for the remote's target here, then time them all on the remote in parallel.

    ``target`` defaults to this host's (the remote is then the same kind of
    CPU); results are keyed by name (the mapping's keys, else the graphs'
    names), in the order given.
    """
    from tfcompile.backends.tvm import as_target, compile_graph, host_target

    named = list(graphs.items()) if isinstance(graphs, Mapping) else [(g.name, g) for g in graphs]
    if len({name for name, _ in named}) != len(named):
        raise TfcompileError("measure_many: variant names must be unique")
    servers_for(remote)  # before compiling anything: a wrong address or key fails in seconds
    target = host_target() if target is None else as_target(target)
    with tempfile.TemporaryDirectory(prefix="tfcompile-rpc-", dir=workdir) as tmp:
        artifacts = []
        for i, (name, graph) in enumerate(named, 1):
            progress(f"[{i}/{len(named)}] compiling {name} for {remote.key}")
            module = compile_graph(graph, target=target, schedule=schedule)
            library = export_module(module, Path(tmp) / f"variant{i}.so", cross_compiler=cross_compiler)
            artifacts.append(RemoteArtifact(name, library, graph.example_inputs, _device_type(target)))
        progress(f"measuring {len(artifacts)} variants on {remote}")
        return measure_artifacts(artifacts, remote, repeat=repeat, number=number, queue_timeout=queue_timeout,
                                 session_timeout=session_timeout, progress=progress)
