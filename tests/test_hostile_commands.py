"""A second corpus of hostile and broken inputs (issue 22), for the commands past plain model loading.

``export``, ``compare``, ``calibrate``, ``tune``, ``optimize`` with ``--remote``, ``--profile``,
``--lengths``, ``--passes`` and ``--quantize``, and the library entry ``tfcompile.optimize_model``.
Written apart from ``tests/frontend/test_hostile_inputs.py`` (different cases of the same classes).
Every case checks the README's promises: exit status 2 (or a ``TfcompileError`` from the library),
exactly one line on stderr, no traceback, nothing written and earlier output untouched (the whole
output area is compared byte for byte), no temporary file or folder left (``tempfile.gettempdir()``
is a private folder per test, snapshotted before and after, and so is the output area), and no
code run from a file (payloads would create a marker file).

Hostile files are generated here; the CLI runs in-process (``tfcompile.cli.main``); the models are
the tiny ones (``tests.tiny``) or ``tiny_mlp`` below, so the whole file runs in about a minute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import stat
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.frontend.hostile import pickle_payload
from tfcompile.cli import main
from tfcompile.errors import TfcompileError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
MARKER = "code-ran"


def _permissions_enforced() -> bool:
    """Whether a folder without write permission refuses new files here: not for root (os.geteuid() == 0)
    with its usual capabilities, which bypass the check; yes for root without CAP_DAC_OVERRIDE."""
    with tempfile.TemporaryDirectory() as folder:
        locked = Path(folder) / "locked"
        locked.mkdir(mode=0o500)
        try:
            (locked / "probe").touch()
        except PermissionError:
            return True
        finally:
            locked.chmod(0o700)
        return False


PERMISSIONS_ENFORCED = _permissions_enforced()
HAS_PROC = Path("/proc/self").exists()


def tiny_mlp():
    """Factory for `tests.test_hostile_commands:tiny_mlp`: compiles with TVM in a second or two."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    return model, (torch.randn(2, 16),)


MLP = "tests.test_hostile_commands:tiny_mlp"


# --- the checks -------------------------------------------------------------------------------------------------

class Sandbox:
    """Per test: ``work`` is where outputs go (snapshotted whole), ``tmp`` is tempfile.gettempdir()."""

    def __init__(self, root: Path):
        self.work, self.tmp, self.inputs = root / "work", root / "systmp", root / "inputs"
        for path in (self.work, self.tmp, self.inputs):
            path.mkdir()
        self.marker = root / MARKER

    def leftovers(self) -> list[str]:
        # Library caches (ONNX Runtime's .ses, torch's torchinductor_*) count too: the CLI gives every run a
        # private temporary folder and removes it.
        return sorted(p.name for p in self.tmp.iterdir())


@pytest.fixture
def box(tmp_path, monkeypatch) -> Sandbox:
    sandbox = Sandbox(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(sandbox.tmp))
    monkeypatch.setenv("TMPDIR", str(sandbox.tmp))  # child processes (TVM's probes and workers)
    return sandbox


def _tree(root: Path) -> dict[str, object]:
    """Every entry below ``root``: files by content, folders and others by kind."""
    entries = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        entries[str(path.relative_to(root))] = path.read_bytes() if stat.S_ISREG(mode) else stat.S_IFMT(mode)
    return entries


@contextlib.contextmanager
def untouched(box: Sandbox):
    """Nothing below the output area changes, and nothing is left in the temporary folder."""
    before = _tree(box.work)
    yield
    assert _tree(box.work) == before, "a failed run wrote, changed or left something in the output area"
    assert box.leftovers() == [], "a failed run left temporary files behind"
    assert not box.marker.exists(), "code from an input file ran"


def run_cli(capsys, *args) -> tuple[int, list[str], str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    return code, lines, captured.err + captured.out


def assert_refused(capsys, box: Sandbox, *args, match: str, status: int = EXIT_USER_ERROR) -> str:
    """Run the CLI; it must refuse in one line containing ``match`` and leave everything as it was."""
    with untouched(box):
        code, lines, everything = run_cli(capsys, *args)
        assert "Traceback" not in everything
        assert code == status, everything
        assert len(lines) == 1, everything
        assert match in lines[0], lines[0]
    return lines[0]


def assert_library_refuses(box: Sandbox, match: str, **kwargs) -> None:
    import tfcompile

    arguments = {"model": "tests.tiny:bert", "output_dir": box.work / "out", **kwargs}
    with untouched(box), pytest.raises(TfcompileError) as caught:
        tfcompile.optimize_model(arguments.pop("model"), arguments.pop("output_dir"), **arguments)
    assert match in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def earlier_output(box: Sandbox, *names: str) -> Path:
    """An output folder from an earlier, successful run: it must survive a failed one byte for byte."""
    out = box.work / "out"
    out.mkdir()
    for name in names:
        (out / name).write_text(f"earlier {name}\n")
    return out


# --- calibration profiles: --profile for compare, $TFCOMPILE_PROFILE_DIR for optimize ---------------------------

def _profile(**changes) -> dict:
    classes = ("gemm", "gemm_skinny", "attention", "norm", "softmax", "memory")
    profile = {"version": 1, "target": "cpu", "backend": "ort", "s_per_flop": {c: 1e-11 for c in classes},
               "s_per_byte": {c: 1e-10 for c in classes}, "kernel_overhead_s": 1e-6, "graph_overhead_s": 1e-5,
               "created": "2026-01-01T00:00:00+00:00", "host": "test", "fit_mape": 0.1,
               "flops_only_s_per_flop": 1e-11, "samples": [{"name": "a", "measured_s": 1e-4, "predicted_s": 1e-4}]}
    for key, value in changes.items():
        if value is None:
            del profile[key]
        else:
            profile[key] = value
    return profile


def _profile_bytes(case: str, marker: Path) -> bytes:
    broken = {
        "pickle-payload": lambda: pickle_payload(marker),
        "not-utf8": lambda: b"\x80\x81\xfe{\"version\": 1}",
        "truncated": lambda: json.dumps(_profile()).encode()[:57],
        "version-2": lambda: json.dumps(_profile(version=2)).encode(),
        "version-true": lambda: json.dumps(_profile(version=True)).encode(),
        "array": lambda: json.dumps([_profile()]).encode(),
        "unknown-field": lambda: json.dumps(_profile(exec="rm -rf /")).encode(),
        "missing-field": lambda: json.dumps(_profile(graph_overhead_s=None)).encode(),
        "coefficients-string": lambda: json.dumps(_profile(s_per_flop="fast")).encode(),
        "coefficient-string": lambda: json.dumps(_profile(s_per_byte={"memory": "1e-10"})).encode(),
        "overhead-nan": lambda: json.dumps(_profile(kernel_overhead_s=float("nan"))).encode(),
        "overhead-negative": lambda: json.dumps(_profile(graph_overhead_s=-1e-5)).encode(),
        "unknown-class": lambda: json.dumps(_profile(s_per_flop={"tensor_core": 1e-12})).encode(),
        "samples-mistyped": lambda: json.dumps(_profile(samples=[{"name": "a", "measured_s": "fast"}])).encode(),
        "probe-negative": lambda: json.dumps(_profile(probe_read_bytes_per_s=-2e10)).encode(),
        "probe-string": lambda: json.dumps(_profile(probe_gemm_flops_per_s="__import__('os')")).encode(),
        "other-target": lambda: json.dumps(_profile(target="a100")).encode(),
        "other-backend": lambda: json.dumps(_profile(backend="tvm")).encode(),
        "nested-too-deep": lambda: b"[" * 200_000,
        "torch-mode-unknown": lambda: json.dumps(_profile(torch_device="cpu", torch_mode="warp",
                                                          torch_precision="fp32")).encode(),
        "torch-options-partial": lambda: json.dumps(_profile(torch_device="cuda")).encode(),
        "torch-other-options": lambda: json.dumps(_profile(torch_device="cuda", torch_mode="graphs",
                                                           torch_precision="bf16", gpu_name="NVIDIA H100")).encode(),
    }
    return broken[case]()


PROFILE_CASES = {
    "pickle-payload": "not a calibration profile",
    "not-utf8": "not a calibration profile",
    "truncated": "invalid JSON",
    "version-2": "version is 2, not 1",
    "version-true": "version is True, not 1",
    "array": "JSON an array, not an object",
    "unknown-field": "unknown field 'exec'",
    "missing-field": "field graph_overhead_s must be a finite number >= 0; found missing",
    "coefficients-string": "field s_per_flop must be an object",
    "coefficient-string": "field s_per_byte.memory must be a finite number >= 0; found str",
    "overhead-nan": "field kernel_overhead_s must be a finite number >= 0; found float nan",
    "overhead-negative": "field graph_overhead_s must be a finite number >= 0",
    "unknown-class": "unknown kernel class 'tensor_core'",
    "samples-mistyped": "field samples[0].measured_s",
    "probe-negative": "field probe_read_bytes_per_s must be a finite number >= 0; found float -20000000000.0",
    "probe-string": "field probe_gemm_flops_per_s must be a finite number >= 0; found str",
    "other-target": "calibration profile for a100/ort, not cpu/ort",
    "other-backend": "calibration profile for cpu/tvm, not cpu/ort",
    "nested-too-deep": "not a calibration profile",
    "torch-mode-unknown": "field torch_mode must be one of eager, graphs, compile",
    "torch-options-partial": "all three given or none",
    "torch-other-options": "measured with torch cuda graphs bf16, not cpu eager fp32",
}


@pytest.mark.parametrize("case", sorted(PROFILE_CASES))
def test_compare_with_a_broken_profile(case, box, capsys):
    profile = box.inputs / "profile.json"
    profile.write_bytes(_profile_bytes(case, box.marker))
    out = earlier_output(box, "compare.json", "compare.png")
    line = assert_refused(capsys, box, "compare", "tests.tiny:bert", "--profile", profile, "-o", out,
                          match=PROFILE_CASES[case])
    assert str(profile) in line  # the message names the file


@pytest.mark.parametrize("case", ["truncated", "coefficient-string", "other-backend", "pickle-payload"])
def test_optimize_with_a_broken_saved_profile(case, box, capsys):
    saved = Path(os.environ["TFCOMPILE_PROFILE_DIR"]) / "cpu-ort.json"
    saved.write_bytes(_profile_bytes(case, box.marker))
    out = earlier_output(box, "report.json", "model.onnx")
    assert_refused(capsys, box, "optimize", "tests.tiny:bert", "-o", out, match=PROFILE_CASES[case])
    assert saved.read_bytes() == _profile_bytes(case, box.marker)  # the user's file is left as it is


def test_saved_profile_that_is_a_directory(box, capsys):
    (Path(os.environ["TFCOMPILE_PROFILE_DIR"]) / "cpu-ort.json").mkdir()
    assert_refused(capsys, box, "optimize", "tests.tiny:bert", "-o", box.work / "out", match="not a file")


def test_a_profile_from_another_host_is_refused(tmp_path):
    """Issue 26: a profile records the host it was measured on and is not used on another."""
    from tfcompile.cost_models.device import host_identity
    from tfcompile.cost_models.model import cost_model_for

    path = tmp_path / "cpu-ort.json"
    path.write_text(json.dumps(_profile(host_id="AMD EPYC; 2 cores; sse4_2,avx,avx2,fma; LLC 8388608 B")))
    with pytest.raises(TfcompileError, match="measured on another host .*calibrate"):
        cost_model_for("cpu", "ort", profile_path=path)
    path.write_text(json.dumps(_profile(host_id=host_identity())))
    assert cost_model_for("cpu", "ort", profile_path=path).kind == "calibrated"


def test_a_valid_profile_is_still_read(tmp_path):
    from tfcompile.cost_models.model import cost_model_for

    path = tmp_path / "cpu-ort.json"
    path.write_text(json.dumps(_profile()))
    assert cost_model_for("cpu", "ort", profile_path=path).kind == "calibrated"
    checked_in = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "profile-cpu-ort.json"
    if checked_in.exists():
        assert cost_model_for("cpu", "ort", profile_path=checked_in).kind == "calibrated"


# --- TVM tuning databases: tune --database, and $TFCOMPILE_TVM_TUNING_DIR for export --backend tvm -------------

def _database(root: Path) -> Path:
    from tfcompile.backends.tvm import host_target
    from tfcompile.backends.tvm.tuning import target_key

    path = root / target_key(host_target())
    path.mkdir(parents=True)
    return path


def _damage_database(path: Path, case: str, marker: Path) -> str:
    """Write one kind of damage into the database at ``path``; the part of the message that names it."""
    workload, records, rules = (path / "database_workload.json", path / "database_tuning_record.json",
                                path / "rules.json")
    if case == "workload-not-utf8":
        workload.write_bytes(b"\xff\xfe\x00[\"1\", \"x\"]\n")
        return "database_workload.json: is not UTF-8 text"
    if case == "workload-wrong-shape":
        workload.write_text('{"workload": 1}\n')
        return "database_workload.json: line 1 is not"
    workload.write_text('["123", "aGVsbG8="]\n')
    if case == "record-not-json":
        records.write_text("[0, [[], [1e-7], {}, []]]\n{oops\n")
        return "database_tuning_record.json: line 2 is not JSON"
    if case == "record-names-no-workload":
        records.write_text("[7, [[], [1e-7], {}, []]]\n")
        return "line 1 names workload 7"
    if case == "rules-mistyped":
        rules.write_text(json.dumps({"123": {"rules_s": "fast", "best_s": None}}))
        return "rules.json: workload 123"
    if case == "rules-pickle-payload":
        rules.write_bytes(pickle_payload(marker))
        return "rules.json: is not JSON"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["workload-not-utf8", "record-not-json", "record-names-no-workload",
                                  "rules-mistyped", "rules-pickle-payload"])
def test_tune_with_a_damaged_database(case, box, capsys):
    root = box.work / "db"
    match = _damage_database(_database(root), case, box.marker)
    assert_refused(capsys, box, "tune", MLP, "--trials", "4", "--database", root, match=match)


def test_tune_database_that_is_a_file(box, capsys):
    root = box.work / "db"
    root.write_text("earlier notes\n")
    assert_refused(capsys, box, "tune", MLP, "--database", root, match="is a file; name a directory")


@pytest.mark.parametrize("case", ["workload-wrong-shape", "rules-pickle-payload"])
def test_export_tvm_with_a_damaged_database(case, box, capsys, monkeypatch):
    root = box.work / "db"
    monkeypatch.setenv("TFCOMPILE_TVM_TUNING_DIR", str(root))
    match = _damage_database(_database(root), case, box.marker)
    (box.work / "model.so").write_bytes(b"earlier library")
    assert_refused(capsys, box, "export", MLP, "--backend", "tvm", "-o", box.work / "model.so", match=match)


def test_export_tvm_with_a_tuning_root_that_is_a_file(box, capsys, monkeypatch):
    root = box.work / "tuning"
    root.write_text("not a folder")
    monkeypatch.setenv("TFCOMPILE_TVM_TUNING_DIR", str(root))
    assert_refused(capsys, box, "export", MLP, "--backend", "tvm", "-o", box.work / "model.so",
                   match="is a file; name a directory")


# --- an RPC tracker that answers junk ---------------------------------------------------------------------------

TRACKER_MAGIC = struct.pack("<i", 0x2f271)


def _framed(value) -> bytes:
    data = json.dumps(value).encode()
    return struct.pack("<i", len(data)) + data


def _read_framed(conn: socket.socket):
    size = struct.unpack("<i", conn.recv(4))[0]
    data = b""
    while len(data) < size:
        data += conn.recv(size - len(data))
    return json.loads(data)


@contextlib.contextmanager
def junk_tracker(answer):
    """A TCP server on 127.0.0.1 that answers each connection with ``answer(conn)`` and closes it.

    Bounded: every socket has a 5 s timeout and the server stops when the test ends.
    """
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError, ValueError, struct.error):
                    answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def _after_handshake(payload: bytes):
    def answer(conn):
        conn.recv(4)
        conn.sendall(TRACKER_MAGIC)
        _read_framed(conn)
        conn.sendall(payload)
    return answer


TRACKER_JUNK = {
    "http-reply": (lambda conn: (conn.recv(4), conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")),
                   "is not a TVM RPC tracker"),
    "two-bytes-and-close": (lambda conn: (conn.recv(4), conn.sendall(b"\x71\xf2")), "does not answer as a TVM RPC"),
    "frame-cut-short": (_after_handshake(struct.pack("<i", 4096) + b"[0, {"), "summary failed"),
    "summary-not-an-object": (_after_handshake(_framed([0, "junk"])), "unexpected summary [0, 'junk']"),
    "empty-answer": (_after_handshake(_framed([])), "unexpected summary []"),
    "servers-not-objects": (_after_handshake(_framed([0, {"server_info": [1, 2]}])), "unexpected summary"),
    "server-address-mistyped": (_after_handshake(_framed([0, {"server_info": [{"key": "server:k", "addr": 9}]}])),
                                "unexpected summary"),
}


@pytest.mark.parametrize("case", sorted(TRACKER_JUNK))
def test_optimize_remote_tracker_answers_junk(case, box, capsys):
    answer, match = TRACKER_JUNK[case]
    out = earlier_output(box, "report.json")
    with junk_tracker(answer) as address:
        assert_refused(capsys, box, "optimize", "tests.tiny:bert", "--measure", "--remote", address,
                       "--device-key", "k", "-o", out, match=match)


def _silent(after_handshake: bool):
    def answer(conn):
        conn.recv(4)
        if after_handshake:
            conn.sendall(TRACKER_MAGIC)
        time.sleep(4)  # and then nothing: the client (1 s timeout below) must give up on its own
    return answer


@pytest.mark.parametrize("after_handshake", [False, True], ids=["silent", "silent-after-handshake"])
def test_tracker_that_never_answers_times_out(after_handshake, box, capsys, monkeypatch):
    from tfcompile.backends.tvm import remote

    monkeypatch.setattr(remote, "CONNECT_TIMEOUT_S", 1.0)
    out = earlier_output(box, "report.json")
    with junk_tracker(_silent(after_handshake)) as address:
        started = time.monotonic()
        line = assert_refused(capsys, box, "optimize", "tests.tiny:bert", "--measure", "--remote", address,
                              "--device-key", "k", "-o", out, match=address)
        assert time.monotonic() - started < 30
    assert "timed out" in line


def test_session_request_answered_with_junk(box, capsys):
    """The summary is right, the request for a server is not: after compiling, still one line."""
    from tvm.rpc.base import TrackerCode

    def answer(conn):
        conn.recv(4)
        conn.sendall(TRACKER_MAGIC)
        request = _read_framed(conn)
        if request[0] == TrackerCode.SUMMARY:
            conn.sendall(_framed([0, {"server_info": [{"key": "server:k", "addr": ["127.0.0.1", 9]}]}]))
        else:
            conn.sendall(_framed([0, "no server for you"]))

    with junk_tracker(answer) as address:
        assert_refused(capsys, box, "optimize", MLP, "--passes", "fold_constants", "--measure", "--measure-top", "0",
                       "--remote", address, "--device-key", "k", "-o", box.work / "out", match="refused")


def test_assigned_server_that_never_answers_times_out(box, capsys, monkeypatch):
    """The tracker hands out a server that accepts the connection and then says nothing."""
    from tvm.rpc.base import TrackerCode

    from tfcompile.backends.tvm import remote

    monkeypatch.setattr(remote, "SERVER_HANDSHAKE_TIMEOUT_S", 2.0)
    with junk_tracker(lambda conn: time.sleep(4)) as server:
        port = int(server.rsplit(":", 1)[1])

        def answer(conn):
            conn.recv(4)
            conn.sendall(TRACKER_MAGIC)
            request = _read_framed(conn)
            if request[0] == TrackerCode.SUMMARY:
                conn.sendall(_framed([0, {"server_info": [{"key": "server:k", "addr": ["127.0.0.1", port]}]}]))
            else:
                conn.sendall(_framed([0, ["127.0.0.1", port, "k"]]))

        with junk_tracker(answer) as address:
            started = time.monotonic()
            assert_refused(capsys, box, "optimize", MLP, "--passes", "fold_constants", "--measure", "--measure-top",
                           "0", "--remote", address, "--device-key", "k", "-o", box.work / "out",
                           match="did not answer within 2 s")
            assert time.monotonic() - started < 60


@pytest.mark.parametrize("command", ["calibrate", "compare"])
def test_calibrate_and_compare_remote_tracker_answers_junk(command, box, capsys):
    answer, match = TRACKER_JUNK["summary-not-an-object"]
    out = box.work / ("profile.json" if command == "calibrate" else "out")
    model = [] if command == "calibrate" else ["tests.tiny:bert"]
    with junk_tracker(answer) as address:
        assert_refused(capsys, box, command, *model, "--remote", address, "--device-key", "k", "-o", out,
                       match=match)


@pytest.mark.parametrize("address", ["tracker", "host:+9190", "host:9_190", "host:\u0663\u0660", "a host:9190",
                                     "[::1]9190", "host:65536"])
def test_remote_address_with_bad_syntax(address, box, capsys):
    assert_refused(capsys, box, "optimize", "tests.tiny:bert", "--measure", "--remote", address, "--device-key", "k",
                   "-o", box.work / "out", match="expected HOST:PORT")


@pytest.mark.parametrize("args,match", [
    (["optimize", "tests.tiny:bert", "--measure", "--remote", "127.0.0.1:9190", "--device-key", "   ", "-o", "{w}/o"],
     "--remote needs --device-key"),
    (["calibrate", "--device-key", "k", "-o", "{w}/p.json"], "--device-key needs --remote"),
    (["compare", "tests.tiny:bert", "--remote", "127.0.0.1:9190", "--device-key", "k", "--backend", "torch",
      "-o", "{w}/o"], "cannot be combined with --backend torch"),
])
def test_remote_key_and_backend_errors(args, match, box, capsys):
    assert_refused(capsys, box, *[a.format(w=box.work) for a in args], match=match)


@pytest.mark.parametrize("args,match", [
    (["calibrate", "--target", "h100", "--backend", "torch"], "calibrating h100 needs that device"),
    (["calibrate", "--backend", "torch", "--device", "cpu", "--mode", "graphs"], "graphs (CUDA-graph replay) needs"),
    (["calibrate", "--backend", "torch", "--device", "cpu", "--precision", "tf32"], "tf32 is a tensor-core format"),
    (["calibrate", "--backend", "torch", "--mode", "warp"], "'warp' is not one of"),
])
def test_calibrate_refuses_torch_options_it_cannot_run(args, match, box, capsys):
    profile = box.work / "profile.json"
    profile.write_text("earlier profile\n")
    assert_refused(capsys, box, *args, "-o", profile, match=match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_calibrate_on_cuda_without_a_gpu(box, capsys):
    assert_refused(capsys, box, "calibrate", "--target", "h100", "--backend", "torch", "--device", "cuda",
                   "-o", box.work / "p.json", match="no CUDA device here")


@pytest.mark.parametrize("args", [
    ["optimize", "tests.tiny:bert", "--target", "a100", "--measure"],
    ["optimize", "tests.tiny:bert", "--target", "h100", "--allow-approx", "--measure"],
    ["optimize", "tiny-decoder", "--generate", "--prompt-len", "8", "--new-tokens", "2", "--target", "edge",
     "--measure"],
    ["compare", "tests.tiny:bert", "--target", "npu"],
])
def test_measuring_another_device_on_this_host_is_refused(args, box, capsys):
    """CPU timings must never rank a GPU's variants: --measure for another target needs that device."""
    out = earlier_output(box, "report.json")
    line = assert_refused(capsys, box, *args, "-o", out, match="needs that device")
    assert "'cpu' (this host)" in line


def test_the_library_refuses_to_measure_another_device(box):
    assert_library_refuses(box, "measuring on h100 needs that device", target="h100", measure=True)


# --- output paths -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["/", "/.", "/.."])
def test_export_output_naming_a_directory_writes_no_file(suffix, box, capsys):
    out = str(box.work / "out" / "dir") + suffix
    assert_refused(capsys, box, "export", "tests.tiny:bert", "-o", out, match="is a directory")


def test_export_output_below_a_file(box, capsys):
    (box.work / "notes").write_text("earlier")
    assert_refused(capsys, box, "export", "tests.tiny:bert", "-o", box.work / "notes" / "model.onnx",
                   match="is a file, so no directory can be made below it")


def test_export_output_that_is_a_fifo(box, capsys):
    os.mkfifo(box.work / "pipe")
    assert_refused(capsys, box, "export", "tests.tiny:bert", "-o", box.work / "pipe", match="not a regular file")


@pytest.mark.skipif(not PERMISSIONS_ENFORCED, reason="running as root (os.geteuid() == 0), which ignores "
                    "permissions: chmod 0o500 does not make a folder unwritable")
@pytest.mark.parametrize("command", ["export", "optimize", "compare", "calibrate"])
def test_output_in_an_unwritable_directory(command, box, capsys):
    locked = box.work / "locked"
    locked.mkdir()
    (locked / "earlier.txt").write_text("earlier")
    locked.chmod(0o500)
    try:
        out = locked / ("model.onnx" if command == "export" else "p.json" if command == "calibrate" else "out")
        model = [] if command == "calibrate" else ["tests.tiny:bert"]
        assert_refused(capsys, box, command, *model, "-o", out, match="is not writable")
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc, a folder nobody (root included) can create files in")
@pytest.mark.parametrize("command", ["export", "optimize", "compare", "calibrate"])
def test_output_where_even_root_cannot_write(command, box, capsys):
    out = {"export": "/proc/model.onnx", "calibrate": "/proc/tfcompile/p.json"}.get(command, "/proc/tfcompile-out")
    model = [] if command == "calibrate" else ["tests.tiny:bert"]
    assert_refused(capsys, box, command, *model, "-o", out, match="/proc is not writable")


def test_calibrate_default_profile_folder_that_is_a_file(box, capsys, monkeypatch):
    """Without -o the profile goes to $TFCOMPILE_PROFILE_DIR: checked before minutes of measuring, too."""
    folder = box.work / "profiles"
    folder.write_text("not a folder")
    monkeypatch.setenv("TFCOMPILE_PROFILE_DIR", str(folder))
    assert_refused(capsys, box, "calibrate", match="is a file, so no directory can be made below it")


def test_compare_output_that_is_a_file(box, capsys):
    (box.work / "results").write_text("earlier")
    assert_refused(capsys, box, "compare", "tests.tiny:bert", "-o", box.work / "results",
                   match="is a file, not a directory")


# --- --lengths, --passes, --quantize ----------------------------------------------------------------------------

@pytest.mark.parametrize("lengths,match", [
    ("", "expected positive integers"),
    ("0", "expected positive integers"),
    ("4,-2", "expected positive integers"),
    ("1.5", "expected positive integers"),
    ("8,x", "expected positive integers"),
    ("8,8", "gives 2 lengths for --batch 1"),
    (str(10**30), "longer than --seq"),
    ("17", "more than the padded length 16"),  # tiny bert's example input has 16 tokens
])
def test_optimize_bad_lengths(lengths, match, box, capsys):
    out = earlier_output(box, "report.json", "model.onnx")
    assert_refused(capsys, box, "optimize", "tests.tiny:bert", "--lengths", lengths, "-o", out, match=match)


@pytest.mark.parametrize("command,passes,match", [
    ("optimize", "fold_constant", "unknown pass 'fold_constant'"),
    ("optimize", "", "names no pass"),
    ("optimize", " , ", "names no pass"),
    ("optimize", "fold_norm_affine,fuse_norm", "fold_norm_affine must run after fuse_norm"),
    ("optimize", "fold_constants,fold_constants", "names fold_constants twice"),
    ("optimize", "fold_constants;eliminate_dead_code", "unknown pass"),
    ("export", "fold_norm_affine,fuse_norm", "fold_norm_affine must run after fuse_norm"),
    ("export", "Fold_Constants", "unknown pass 'Fold_Constants'"),
    ("export", "fold_constants,eliminate_dead_code,fold_constants", "names fold_constants twice"),
    ("tune", "fold_constants,fold_constants", "names fold_constants twice"),
    ("tune", "no_such_pass", "unknown pass 'no_such_pass'"),
])
def test_bad_pass_pipelines(command, passes, match, box, capsys):
    model = MLP if command == "tune" else "tests.tiny:bert"
    out = {"optimize": ["-o", box.work / "out"], "export": ["-o", box.work / "model.onnx"],
           "tune": ["--database", box.work / "db"]}[command]
    assert_refused(capsys, box, command, model, "--passes", passes, *out, match=match)


@pytest.mark.parametrize("mode", ["int4", "INT8", ""])
def test_optimize_unknown_quantize_mode(mode, box, capsys):
    assert_refused(capsys, box, "optimize", "tests.tiny:bert", "--quantize", mode, "-o", box.work / "out",
                   match="--quantize")


def test_quantize_below_budget_after_the_search_writes_nothing(box, capsys):
    """A failure at the very end (the quantized export misses --budget): earlier outputs stay as they were."""
    out = earlier_output(box, "report.json", "model.onnx")
    assert_refused(capsys, box, "optimize", "tests.tiny:bert", "--passes", "fold_constants", "--quantize", "int8",
                   "--budget", "1.0", "-o", out, match="below --budget 1.0; nothing written")


# --- the library entry: tfcompile.optimize_model ----------------------------------------------------------------

LIBRARY_CASES = {
    "budget-string": ({"budget": "high"}, "--budget 'high'"),
    "budget-bool": ({"budget": True}, "--budget True"),
    "repeat-float": ({"repeat": 2.5}, "--repeat 2.5"),
    "measure-top-none": ({"measure_top": None}, "--measure-top None"),
    "backend-unknown": ({"backend": "cuda"}, "--backend 'cuda'"),
    "passes-a-string": ({"passes": "fold_constants"}, "a list of pass names"),
    "passes-empty": ({"passes": ()}, "names no pass"),
    "lengths-zero": ({"lengths": [0]}, "--lengths [0]"),
    "lengths-not-a-list": ({"lengths": 16}, "--lengths 16"),
    "lengths-float": ({"lengths": [7.5]}, "--lengths [7.5]"),
    "remote-a-string": ({"remote": "127.0.0.1:9190", "measure": True}, "a RemoteSpec"),
    "target-none": ({"target": None}, "--target None"),
    "output-none": ({"output_dir": None}, "-o None"),
    "model-not-a-name": ({"model": 42}, "model 42"),
    "load-not-options": ({"load": {"batch": 2}}, "a tfcompile.frontend.LoadOptions"),
    "quantize-unknown": ({"quantize": "int4"}, "--quantize 'int4'"),
    "allow-approx-string": ({"allow_approx": "no"}, "--allow-approx 'no'"),
}


@pytest.mark.parametrize("case", sorted(LIBRARY_CASES))
def test_library_refuses_bad_arguments(case, box):
    kwargs, match = LIBRARY_CASES[case]
    earlier_output(box, "report.json", "model.onnx")
    assert_library_refuses(box, match, **kwargs)


# --- interrupted and failed runs leave nothing behind -----------------------------------------------------------

@contextlib.contextmanager
def rewrite_raises(pass_name: str, exc: BaseException):
    """The registered pass's rewrite raises ``exc`` (Pass is frozen: swapped in and out by hand)."""
    from tfcompile.passes import get_pass

    registered = get_pass(pass_name)
    original = registered.rewrite

    def interrupted(graph, plan):
        raise exc

    object.__setattr__(registered, "rewrite", interrupted)
    try:
        yield
    finally:
        object.__setattr__(registered, "rewrite", original)


def test_interrupt_mid_search_through_the_library(box):
    import tfcompile

    out = earlier_output(box, "report.json", "model.onnx")
    with untouched(box), rewrite_raises("merge_qkv_projections", KeyboardInterrupt()), \
            pytest.raises(KeyboardInterrupt):
        tfcompile.optimize_model("tests.tiny:bert", out, target="cpu", measure=True, repeat=1)


def test_interrupt_mid_search_through_the_cli(box, capsys):
    out = earlier_output(box, "report.json", "model.onnx")
    with rewrite_raises("merge_qkv_projections", KeyboardInterrupt()):
        assert_refused(capsys, box, "optimize", "tests.tiny:bert", "-o", out, match="interrupted",
                       status=EXIT_INTERRUPTED)


def test_interrupt_while_measuring_removes_the_work_folder(box, monkeypatch):
    """The measurement has written its ONNX files into the tfcompile-* work folder when Ctrl-C comes."""
    import tfcompile
    from tfcompile import optimize as optimize_module

    real = optimize_module.measure_here
    seen = []

    def measure_then_interrupt(graphs, backend, workdir, **kwargs):
        real(graphs, backend, workdir, **kwargs)
        seen.append(sorted(p.name for p in Path(workdir).iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(optimize_module, "measure_here", measure_then_interrupt)
    out = earlier_output(box, "report.json", "model.onnx")
    with untouched(box), pytest.raises(KeyboardInterrupt):
        tfcompile.optimize_model("tests.tiny:bert", out, passes=("fold_constants",), measure=True, repeat=1)
    assert seen and seen[0], "the interruption came before anything was written: the test shows nothing"


def test_interrupt_between_model_and_report_keeps_the_earlier_pair(box, monkeypatch):
    """model.onnx and report.json belong together: never a new model beside an old report."""
    import tfcompile
    from tfcompile import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_report", interrupted)
    out = earlier_output(box, "report.json", "model.onnx")
    with untouched(box), pytest.raises(KeyboardInterrupt):
        tfcompile.optimize_model("tests.tiny:bert", out, passes=("fold_constants",))


def test_first_run_interrupted_leaves_no_empty_output_folder(box, monkeypatch):
    import tfcompile
    from tfcompile import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_report", interrupted)
    with untouched(box), pytest.raises(KeyboardInterrupt):
        tfcompile.optimize_model("tests.tiny:bert", box.work / "new" / "out", passes=("fold_constants",))


def test_compare_outputs_are_replaced_together(box, monkeypatch):
    """compare.json and compare.png: a failure drawing the plot leaves the earlier pair as it was."""
    from tfcompile import compare

    def broken_plot(rows, path, *, title):
        path.write_bytes(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "plot", broken_plot)
    out = earlier_output(box, "compare.json", "compare.png")
    rows = [compare.ComparisonRow("a", 1.0, {"roofline": 1.1})]
    with untouched(box), pytest.raises(KeyboardInterrupt):
        compare.write_outputs(rows, compare.score(rows), out, title="t")


# --- --device-file: a user's own device, validated field by field -------------------------------------------------

def _device_file(box: Sandbox, text: str) -> Path:
    from tfcompile.cost_models.device import device_file

    shipped = device_file("a100").read_text()
    path = box.inputs / "mine.toml"
    path.write_text(text.replace("$A100", shipped))
    return path


@pytest.mark.parametrize("text,match", [
    ("name = 'x'\n", "missing"),
    ("not = [toml", "not valid TOML"),
    ("$A100\n[extra]\n", "unknown field extra"),
    ("name = 'x'\nmem_bandwith_gbps = 1\n", "unknown field mem_bandwith_gbps"),
    ("\x00\xff" * 10, "not valid TOML"),
])
def test_bad_device_files(text, match, box, capsys):
    path = _device_file(box, text)
    out = earlier_output(box, "report.json", "model.onnx")
    assert_refused(capsys, box, "optimize", "tests.tiny:bert", "--device-file", path, "-o", out, match=match)


def test_device_file_with_a_mistyped_field(box, capsys):
    from tfcompile.cost_models.device import device_file

    text = device_file("a100").read_text().replace("mem_bandwidth_gbps = 2039", 'mem_bandwidth_gbps = "fast"')
    path = box.inputs / "mine.toml"
    path.write_text(text)
    assert_refused(capsys, box, "optimize", "tests.tiny:bert", "--device-file", path, "-o", box.work / "out",
                   match="mem_bandwidth_gbps")


def test_device_file_too_large_is_not_read(box, capsys):
    path = box.inputs / "huge.toml"
    with path.open("wb") as f:
        f.truncate(64 * 1024**2)  # sparse: 64 MiB of zeros
    assert_refused(capsys, box, "optimize", "tests.tiny:bert", "--device-file", path, "-o", box.work / "out",
                   match="too large for a device file")


def test_device_file_and_target_together_are_refused(box, capsys):
    from tfcompile.cost_models.device import device_file

    assert_refused(capsys, box, "optimize", "tests.tiny:bert", "--device-file", device_file("a100"), "--target",
                   "h100", "-o", box.work / "out", match="leave out --target")


def test_a_device_file_is_ranked_under_its_own_name(box, capsys):
    from tfcompile.cost_models.device import device_file

    text = device_file("a100").read_text().replace('name = "a100"', 'name = "my-gpu"')
    path = box.inputs / "mine.toml"
    path.write_text(text)
    code, lines, everything = run_cli(capsys, "optimize", "tests.tiny:bert", "--device-file", path, "--passes",
                                      "fold_constants", "-o", box.work / "out")
    assert code == 0, everything
    report = json.loads((box.work / "out" / "report.json").read_text())
    assert report["target"] == "my-gpu"
    assert all(v["predicted_ms"]["my-gpu"] > 0 for v in report["variants"])
    # The same spec under the shipped name predicts the same: the file is the device, not its name.
    assert all(v["predicted_ms"]["my-gpu"] == pytest.approx(v["predicted_ms"]["a100"]) for v in report["variants"])


def test_targets_show_takes_names_not_paths(box, capsys):
    assert_refused(capsys, box, "targets", "--show", "../cost_models/devices/a100", match="unknown target")
    code, _, everything = run_cli(capsys, "targets", "--show", "h100")
    assert code == 0 and 'name = "h100"' in everything


@pytest.mark.parametrize("args,match", [
    (["export", MLP, "--backend", "tvm", "-o", "{work}/model.onnx"], "--backend tvm writes a .so"),
    (["export", MLP, "-o", "{work}/model.so"], "--backend ort writes a .onnx file"),
    (["compare", MLP, "--batches", "1,,2", "-o", "{work}/cmp"], "expected positive integers"),
])
def test_outputs_named_for_another_format_and_list_typos(args, match, box, capsys):
    with untouched(box):
        code, lines, everything = run_cli(capsys, *[a.format(work=box.work) for a in args])
    assert code == EXIT_USER_ERROR and len(lines) == 1 and match in lines[0], everything
    assert everything.strip() == lines[0]  # nothing on stdout before the refusal either


def test_a_user_exception_whose_message_raises_is_still_one_line(box, capsys, monkeypatch):
    module = box.inputs / "weird_factory.py"
    module.write_text("class Weird(Exception):\n    def __str__(self):\n        raise RuntimeError('no message')\n\n"
                      "def make():\n    raise Weird()\n")
    monkeypatch.syspath_prepend(str(box.inputs))
    assert_refused(capsys, box, "optimize", "weird_factory:make", "-o", box.work / "out", match="raised Weird")


@pytest.mark.parametrize("command", ["optimize", "compare"])
def test_an_empty_output_directory_is_not_the_current_one(command, box, capsys, monkeypatch):
    monkeypatch.chdir(box.work)
    assert_refused(capsys, box, command, MLP, "-o", "", match="-o ''")


def test_a_tvm_library_that_differs_from_torch_is_not_written(box, capsys, monkeypatch):
    from tfcompile import verify

    real = verify.compare_outputs

    def off_by_a_lot(*args, **kwargs):
        check = real(*args, **kwargs)
        return dataclasses.replace(check, max_rel_err=0.5)

    monkeypatch.setattr(verify, "compare_outputs", off_by_a_lot)
    (box.work / "model.so").write_bytes(b"earlier library")
    assert_refused(capsys, box, "export", MLP, "--backend", "tvm", "-o", box.work / "model.so",
                   match="differs from torch by 5.0e-01", status=EXIT_USER_ERROR)


# --- workloads: --lengths-file and size lists (issue 23) ------------------------------------------------------

def _lengths_file(box: Sandbox, kind: str) -> Path:
    path = box.inputs / "lengths.txt"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "huge":
        with path.open("wb") as f:
            f.truncate(64 << 20)  # sparse; refused by its size before anything is read
    elif kind == "bad-line":
        path.write_text("12\n12 3 9\n")
    elif kind == "too-long":
        path.write_text("12\n4096\n")
    elif kind == "empty":
        path.write_text("# nothing but a comment\n")
    elif kind == "payload-path":
        path.write_text("__import__('os').system('touch code-ran')\n")
    return path


@pytest.mark.parametrize("kind,extra,match", [
    ("missing", [], "does not exist"),
    ("directory", [], "is a directory"),
    ("binary", [], "not a text file"),
    ("huge", [], "a length file is at most"),
    ("bad-line", [], "line 2"),
    ("too-long", [], "4096 is longer than --seq 128"),
    ("empty", [], "no lengths in it"),
    ("payload-path", [], "line 1"),
    ("bad-line", ["--lengths", "3"], "not both"),
    ("too-long", ["--seq", "16,32"], "padded to: one value"),
])
def test_bad_length_files(kind, extra, match, box, capsys):
    path = _lengths_file(box, kind)
    out = earlier_output(box, "report.json", "model.onnx")
    assert_refused(capsys, box, "optimize", MLP, "--lengths-file", path, *extra, "-o", out, match=match)


@pytest.mark.parametrize("command", ["export", "tune"])
def test_size_lists_are_for_optimize_only(command, box, capsys):
    out = ["-o", box.work / "m.onnx"] if command == "export" else ["--database", box.work / "db"]
    assert_refused(capsys, box, command, MLP, "--seq", "16..64", *out, match="this command traces one shape")


# --- optimize --generate: a causal LM's directory, file or options ----------------------------------------------

def _tiny_gpt2_dir(root: Path, **config) -> Path:
    from transformers import GPT2Config

    from tfcompile.frontend.zoo import TINY_CONFIGS

    folder = root / "tiny-gpt2"
    # Token ids inside the tiny vocabulary, so transformers has nothing to warn about on loading.
    GPT2Config(**{**TINY_CONFIGS["gpt2-small"], "bos_token_id": 0, "eos_token_id": 0, **config}).save_pretrained(folder)
    return folder


def _tiny_gpt2_checkpoint(root: Path) -> Path:
    from transformers import GPT2LMHeadModel

    folder = _tiny_gpt2_dir(root)
    GPT2LMHeadModel(GPT2LMHeadModel.config_class.from_pretrained(folder)).save_pretrained(folder)
    return folder


def _generate(capsys, box: Sandbox, model, *args, match: str) -> None:
    out = earlier_output(box, "prefill.onnx", "decode.onnx", "report.json")
    assert_refused(capsys, box, "optimize", model, "--generate", "--prompt-len", "8", "--new-tokens", "4", *args,
                   "-o", out, match=match)


def test_generate_on_a_pickle_file_reads_nothing(box, capsys):
    payload = box.inputs / "model.pt"
    payload.write_bytes(pickle_payload(box.marker))
    _generate(capsys, box, payload, match="traces a Hugging Face causal LM")


def test_generate_on_a_directory_whose_checkpoint_is_a_pickle(box, capsys):
    folder = _tiny_gpt2_dir(box.inputs)
    (folder / "pytorch_model.bin").write_bytes(pickle_payload(box.marker))
    _generate(capsys, box, folder, match=str(folder))


def test_generate_on_a_directory_naming_custom_code(box, capsys):
    folder = _tiny_gpt2_dir(box.inputs, auto_map={"AutoModelForCausalLM": "evil.Model"})
    (folder / "evil.py").write_text(f"open({str(box.marker)!r}, 'w').close()\n")
    _generate(capsys, box, folder, match="auto_map")


def test_generate_with_a_prompt_longer_than_the_model_positions(box, capsys):
    _generate(capsys, box, _tiny_gpt2_checkpoint(box.inputs), "--prompt-len", "200",
              match="exceeds the model's 128 positions")


def test_generate_with_a_cache_larger_than_memory_allocates_nothing(box, capsys):
    _generate(capsys, box, _tiny_gpt2_checkpoint(box.inputs), "--prompt-len", "100", "--new-tokens", "28",
              "--batch", str(1 << 20), match="KV cache")


@pytest.mark.parametrize("args,match", [
    (("--prompt-len", "0"), "--prompt-len"),
    (("--new-tokens", str(1 << 30)), "--new-tokens"),
    (("--lengths", "3"), "--lengths does not apply to --generate"),
    (("--passes", "fold_constants"), "--passes does not apply to --generate"),
    (("--backend", "tvm"), "TVM does not run the generation graphs"),
])
def test_generate_bad_options(args, match, box, capsys):
    _generate(capsys, box, "gpt2-small", *args, match=match)


@pytest.mark.parametrize("value, match", [("-1", "--explain-ops"), ("three", "--explain-ops"),
                                          ("2", "per-kernel profile")])
def test_compare_explain_ops_that_cannot_be_done(value, match, box, capsys):
    """A count that is no count, or one asked of a backend without a profiler: refused before anything runs."""
    backend = ["--backend", "torch"] if value == "2" else []
    earlier = earlier_output(box, "compare.json", "compare.png")
    assert_refused(capsys, box, "compare", "tests.tiny:bert", *backend, "--explain-ops", value, "-o", earlier,
                   match=match)
