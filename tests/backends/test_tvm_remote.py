"""Measuring on another machine through TVM's RPC tracker and servers (here all on 127.0.0.1)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("tvm")
pytest.importorskip("tornado")  # TVM's RPC tracker needs it

import psutil  # noqa: E402

from tests.tiny import TINY_OVERRIDES  # noqa: E402
from tfcompile.backends.tvm import compile_graph, set_num_threads  # noqa: E402
from tfcompile.backends.tvm.remote import (RemoteArtifact, RemoteError, RemoteSpec, export_module,  # noqa: E402
                                           measure_artifacts, measure_local, servers_for)
from tfcompile.backends.tvm.rpc_local import free_port, local_rpc  # noqa: E402
from tfcompile.backends.tvm.target import host_cores  # noqa: E402
from tfcompile.errors import TfcompileError  # noqa: E402
from tfcompile.frontend import LoadOptions, load_model  # noqa: E402
from tfcompile.variants import CLEANUP, VariantSpec, build_variant  # noqa: E402
from tfcompile.verify import compare_outputs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

VARIANTS = (
    VariantSpec("baseline", ()),
    VariantSpec("cleanup", CLEANUP),
    VariantSpec("cleanup+merge_qkv", CLEANUP + ("merge_qkv_projections",)),
    VariantSpec("fold_constants", ("fold_constants",)),
)
REPEAT = 30

# Remote and local medians of the same compiled library must agree within this
# factor. It is wide on purpose: this 2-core VM is shared, the two servers time
# two variants at once (one TVM thread each, as the local run), and a sub-ms
# median of a tiny model moves by 20-40 % between runs under other load; a
# real fault (the remote timing network round trips, running another build,
# or unscheduled loops) moves it by 10x or more.
NOISE_FACTOR = 2.0


def _all_gone(pids: set[int], timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


@pytest.mark.slow  # four TVM builds and a tracker with two servers; twin: test_one_variant_through_..._one_server
def test_four_variants_through_tracker_and_two_servers_match_local(tmp_path):
    # One layer of tiny BERT: compiling four variants is most of this test's time.
    graph = load_model("bert-base", LoadOptions(batch=1, seq=64, config_overrides={
        **TINY_OVERRIDES["bert-base"], "num_hidden_layers": 1}))
    with local_rpc(servers=2, key="tfcompile-test", threads=1, wait=False) as rpc:
        # Compile here while the tracker and servers start.
        variants = {spec.name: build_variant(graph, spec) for spec in VARIANTS}
        modules, artifacts = {}, []
        for name, variant in variants.items():
            modules[name] = compile_graph(variant.graph)
            library = export_module(modules[name], tmp_path / f"{name}.so")
            artifacts.append(RemoteArtifact(name, library, variant.graph.example_inputs))
        rpc.wait_ready()
        started = rpc.group_pids()
        assert len(started) >= 3  # tracker, two servers (and their TVM workers)
        assert len(servers_for(rpc.remote)) == 2
        with pytest.raises(RemoteError, match="no TVM RPC server with key 'absent'.*keys there: tfcompile-test"):
            servers_for(RemoteSpec(rpc.remote.host, rpc.remote.port, "absent"))
        results = measure_artifacts(artifacts, rpc.remote, repeat=REPEAT)
        started |= rpc.group_pids()
    assert _all_gone(started) == [], "processes left running after local_rpc"

    # Dispatched over both servers, with sessions running at the same time.
    assert list(results) == [spec.name for spec in VARIANTS]
    assert len({r.server for r in results.values()}) == 2
    spans = sorted((r.started_s, r.ended_s) for r in results.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans

    # Outputs computed on the remote match torch.
    for name, result in results.items():
        variant = variants[name]
        check = compare_outputs(variant.graph.run(), result.outputs, variant.graph.output_names)
        assert check.max_rel_err < 1e-4, (name, check.max_rel_err)
        assert result.measurement.backend == "tvm@tfcompile-test"
        assert len(result.measurement.samples_s) == REPEAT

    # The same libraries timed in this process the same way, on one thread like each server.
    set_num_threads(1)
    try:
        local = {name: measure_local(modules[name], variants[name].graph.example_inputs, repeat=REPEAT)
                 for name in variants}
    finally:
        set_num_threads(host_cores())
    summary = {name: (round(results[name].measurement.median_ms, 4), round(local[name].median_ms, 4))
               for name in variants}
    print("remote vs local median ms:", summary)
    for name, (remote_ms, local_ms) in summary.items():
        assert 1 / NOISE_FACTOR <= remote_ms / local_ms <= NOISE_FACTOR, (name, summary)


def test_one_variant_through_tracker_and_one_server_matches_torch(tmp_path):
    """Fast twin of the test above: one small linear+GELU graph, timed by a tracker's only server."""
    import torch

    from tfcompile.graph import export_module as trace_module

    torch.manual_seed(0)
    graph = trace_module(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU()), (torch.randn(1, 16, 64),),
                         name="linear-gelu")
    with local_rpc(servers=1, key="tfcompile-twin", threads=1, wait=False) as rpc:
        library = export_module(compile_graph(graph), tmp_path / "baseline.so")  # while the servers start
        rpc.wait_ready()
        started = rpc.group_pids()
        assert len(started) >= 2  # tracker and server
        assert len(servers_for(rpc.remote)) == 1
        results = measure_artifacts([RemoteArtifact("baseline", library, graph.example_inputs)], rpc.remote,
                                    repeat=3)
        started |= rpc.group_pids()
    assert _all_gone(started) == [], "processes left running after local_rpc"
    assert list(results) == ["baseline"]
    result = results["baseline"]
    assert compare_outputs(graph.run(), result.outputs, graph.output_names).max_rel_err < 1e-4
    assert result.measurement.backend == "tvm@tfcompile-twin" and len(result.measurement.samples_s) == 3
    assert result.measurement.median_s > 0


def test_unreachable_tracker_fails_fast_with_one_line():
    remote = RemoteSpec("127.0.0.1", free_port(), "any")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RemoteError, match="cannot reach the TVM RPC tracker at 127.0.0.1:"):
        servers_for(remote)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("address, key, match", [
    ("localhost", "k", "expected HOST:PORT"),
    ("localhost:notaport", "k", "expected HOST:PORT"),
    ("localhost:9190", None, "--remote needs --device-key"),
])
def test_remote_spec_parse_errors(address, key, match):
    with pytest.raises(TfcompileError, match=match):
        RemoteSpec.parse(address, key)


def test_remote_spec_parse():
    assert RemoteSpec.parse("10.0.0.7:9190", "jetson") == RemoteSpec("10.0.0.7", 9190, "jetson")
    assert RemoteSpec.parse("[::1]:9190", "k").host == "::1"


@pytest.mark.parametrize("args, match", [
    (["--measure", "--remote", "127.0.0.1:9190", "--device-key", "k", "--backend", "ort"],
     "cannot be combined with --backend ort"),
    (["--measure", "--remote", "127.0.0.1:9190"], "--remote needs --device-key"),
    (["--measure", "--device-key", "k"], "--device-key needs --remote"),
    (["--remote", "127.0.0.1:9190", "--device-key", "k"], "add --measure"),
    (["--measure", "--remote", f"127.0.0.1:{free_port()}", "--device-key", "k"],
     "cannot reach the TVM RPC tracker at 127.0.0.1:"),  # fails before the search, in seconds
])
def test_cli_remote_option_errors(args, match, tmp_path, capsys):
    from tfcompile.cli import main

    assert main(["optimize", "tests.tiny:bert", "-o", str(tmp_path / "out"), *args]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_optimize_and_compare_hand_measurement_to_the_remote(monkeypatch):
    """The wiring, without RPC: optimize and compare send their variants to measure_many and report its figures."""
    from tfcompile.backends.timing import Measurement
    from tfcompile.backends.tvm import remote as remote_module
    from tfcompile.compare import measure_and_predict
    from tfcompile.cost_models import load_device
    from tfcompile.cost_models.model import RooflineCostModel
    from tfcompile.optimize import OptimizeSettings, optimize

    calls = []

    def fake_measure_many(graphs, remote, *, repeat, target, cross_compiler, progress):
        calls.append((dict(graphs), remote, repeat))
        return {name: remote_module.RemoteResult(name, Measurement(remote.label, 1e-3 * (i + 1), (1e-3,)),
                                                 graph.run(), "127.0.0.1:1", 0.0, 0.0)
                for i, (name, graph) in enumerate(graphs.items())}

    monkeypatch.setattr(remote_module, "measure_many", fake_measure_many)
    monkeypatch.setattr(remote_module, "servers_for", lambda remote: ["127.0.0.1:1"])
    spec = RemoteSpec("127.0.0.1", 9190, "phone")
    graph = load_model("bert-base", LoadOptions(batch=1, seq=16, config_overrides={
        **TINY_OVERRIDES["bert-base"], "num_hidden_layers": 1}))
    result = optimize(graph, OptimizeSettings(target="cpu", pipeline=("fold_constants",), measure=True,
                                              backend="tvm", repeat=7, remote=spec))
    result.cleanup()
    assert set(calls[0][0]) == {"baseline", "custom:fold_constants"} and calls[0][1:] == (spec, 7)
    measured = {r.name: (r.measured_ms, r.backend) for r in result.reports if r.measured_ms is not None}
    assert measured == {"baseline": (1.0, "tvm@phone"), "custom:fold_constants": (2.0, "tvm@phone")}

    rows = measure_and_predict([graph, graph], cost_model=RooflineCostModel(load_device("cpu"), "tvm"), repeat=3,
                               remote=spec)
    assert [r.measured_ms for r in rows] == [1.0, 2.0] and all("roofline" in r.predicted_ms for r in rows)


@pytest.mark.slow  # two CLI runs that compile five variants: about 100 s on the 2-core VM
def test_cli_optimize_and_compare_measure_on_remote(tmp_path):
    with local_rpc(servers=2, key="cli-test", threads=1) as rpc:
        address = f"{rpc.remote.host}:{rpc.remote.port}"
        result = subprocess.run(
            [sys.executable, "-m", "tfcompile.cli", "optimize", "tests.tiny:bert", "--passes", "fold_constants",
             "--measure", "--remote", address, "--device-key", "cli-test", "--repeat", "5",
             "-o", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "measured: tvm@cli-test (key 'cli-test' on tracker" in " ".join(result.stdout.split())
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert report["settings"]["backend"] == "tvm"
        assert report["settings"]["remote"] == f"key 'cli-test' on tracker {address}"
        measured = [v for v in report["variants"] if v.get("measured_ms")]
        assert {v["name"] for v in measured} == {"baseline", "custom:fold_constants"}
        assert all(v["backend"] == "tvm@cli-test" and v["measured_ms"] > 0 for v in measured)

        result = subprocess.run(
            [sys.executable, "-m", "tfcompile.cli", "compare", "tests.tiny:bert", "--repeat", "5",
             "--remote", address, "--device-key", "cli-test", "-o", str(tmp_path / "cmp")],
            cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["variants"]
        assert len(rows) == 3 and all(r["measured_ms"] > 0 for r in rows)
