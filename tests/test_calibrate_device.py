"""The torch device backend's calibration on cpu (CI has no GPU): suite, fit, save, load, refusals, the CLI,
and benchmarks/gpu_check.py's CPU dry run."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tfcompile import calibrate_device
from tfcompile.calibrate_device import CPU_SIZES, calibrate_torch, device_suite
from tfcompile.cost_models.calibration import Profile, load_profile, profile_path, save_profile
from tfcompile.cost_models.nnls import nnls_numpy
from tfcompile.cost_models.fusion import Kernel
from tfcompile.cost_models.model import cost_model_for
from tfcompile.errors import TfcompileError
from tfcompile.graph import export_module

ROOT = Path(__file__).resolve().parent.parent
# Every class once, at the cpu suite's smallest sizes: a fit in a few seconds.
TINY_SIZES = dataclasses.replace(CPU_SIZES, gemm_rows=(1, 16, 128), gemm_shapes=((256, 256),),
                                 attention=CPU_SIZES.attention[:2], softmax=CPU_SIZES.softmax[:1],
                                 elementwise=(1 << 12, 1 << 16), chains=(1, 16))
CPU_FP32 = {"device": "cpu", "mode": "eager", "precision": "fp32"}


@pytest.fixture(scope="module")
def fitted():
    return calibrate_torch("cpu", CPU_FP32, repeat=3, suite=device_suite("cpu", TINY_SIZES))


def test_cuda_suite_has_the_issues_sweep_and_every_kernel_class():
    names = [b.name for b in device_suite("cuda")]
    assert len(names) == len(set(names))
    for rows in (1, 16, 128, 512, 2048, 8192):
        assert f"linear_m{rows}_k4096_n4096" in names
    for prefix in ("sdpa_", "layernorm_", "rmsnorm_", "softmax_", "gelu_", "add_", "chain_"):
        assert sum(n.startswith(prefix) for n in names) >= 2, prefix
    # Held-out every 4th: the interleaving puts other classes than GEMMs among them.
    assert {n.split("_")[0] for n in names[3::4]} - {"linear"}


def test_cpu_suite_costs_every_class_the_fit_has():
    from tfcompile.cost_models.calibration import kernel_class
    from tfcompile.cost_models.fusion import group_kernels

    classes = set()
    for bench in device_suite("cpu", TINY_SIZES):
        module, inputs = bench.build()
        classes |= {kernel_class(k) for k in group_kernels(export_module(module, inputs, name=bench.name), "torch")}
    assert {"gemm", "gemm_skinny", "attention", "norm", "softmax", "memory"} <= classes


def test_cpu_calibration_fits_saves_and_loads_for_its_options_only(fitted, tmp_path, monkeypatch):
    profile, run = fitted
    assert not run.skipped and len(run.samples) == len(device_suite("cpu", TINY_SIZES))
    assert profile.torch_options == CPU_FP32 and profile.gpu_name == "" and profile.host_id
    assert 0 < profile.fit_mape < 1 and profile.heldout_roofline_mape > 0
    assert profile.kernel_overhead_s > 0  # the launch floor is fitted, not left at zero
    monkeypatch.setenv("TFCOMPILE_PROFILE_DIR", str(tmp_path))
    path = save_profile(profile)
    assert path == tmp_path / "cpu-torch-cpu-eager-fp32.json" == profile_path("cpu", "torch", CPU_FP32)
    loaded = load_profile("cpu", "torch", torch_options=CPU_FP32)
    assert loaded.s_per_flop == profile.s_per_flop and loaded.torch_options == CPU_FP32
    assert cost_model_for("cpu", "torch", torch_options=CPU_FP32).kind == "calibrated"
    assert load_profile("cpu", "torch") is None  # torch as it is has its own file
    bf16 = {**CPU_FP32, "precision": "bf16"}
    with pytest.raises(TfcompileError, match="measured with torch cpu eager fp32, not cpu eager bf16"):
        load_profile("cpu", "torch", path, torch_options=bf16)
    with pytest.raises(TfcompileError, match="not cpu eager fp32; calibrate these options"):
        load_profile("cpu", "torch", path)


def test_a_gpu_profile_is_refused_on_another_gpu_or_without_one(fitted, tmp_path):
    profile, _ = fitted
    h100 = dataclasses.replace(profile, target="h100", host_id="", torch_device="cuda", torch_mode="graphs",
                               torch_precision="bf16", gpu_name="NVIDIA H100 80GB HBM3")
    path = save_profile(h100, tmp_path / "h100.json")
    options = {"device": "cuda", "mode": "graphs", "precision": "bf16"}
    assert load_profile("h100", "torch", path, options, gpu_name="NVIDIA H100 80GB HBM3").gpu_name == h100.gpu_name
    with pytest.raises(TfcompileError, match="measured on NVIDIA H100 80GB HBM3, this machine has NVIDIA A100"):
        load_profile("h100", "torch", path, options, gpu_name="NVIDIA A100-SXM4-80GB")
    with pytest.raises(TfcompileError, match="this machine has no CUDA device"):
        load_profile("h100", "torch", path, options, gpu_name="")
    with pytest.raises(TfcompileError, match="cuda graphs bf16, not cuda eager bf16"):
        load_profile("h100", "torch", path, {**options, "mode": "eager"}, gpu_name="NVIDIA H100 80GB HBM3")


def test_a_half_precision_profile_prices_its_own_dtype_at_the_fitted_rate():
    common = dict(target="h100", backend="torch", s_per_flop={"gemm": 1e-15}, s_per_byte={}, kernel_overhead_s=0.0,
                  graph_overhead_s=0.0)
    speedup = {"fp32": 1.0, "bf16": 14.8}
    kernel = Kernel(nodes=["mm"], op_class="gemm", flops=1e12, bytes_read=0, bytes_written=0, dtype="bf16",
                    tokens=1024)
    fp32_kernel = dataclasses.replace(kernel, dtype="fp32")
    bf16_profile = Profile(**common, torch_device="cuda", torch_mode="graphs", torch_precision="bf16")
    assert bf16_profile.kernel_s(kernel, flop_speedup=speedup) == pytest.approx(1e-3)
    assert bf16_profile.kernel_s(fp32_kernel, flop_speedup=speedup) == pytest.approx(14.8e-3)
    assert Profile(**common).kernel_s(kernel, flop_speedup=speedup) == pytest.approx(1e-3 / 14.8)


def test_bad_torch_fields_in_a_profile_are_one_clear_error(fitted, tmp_path):
    data = json.loads(fitted[0].to_json())
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**data, "torch_mode": "warp"}))
    with pytest.raises(TfcompileError, match="field torch_mode must be one of eager, graphs, compile"):
        load_profile("cpu", "torch", path, CPU_FP32)
    path.write_text(json.dumps({**data, "torch_mode": ""}))
    with pytest.raises(TfcompileError, match="all three given or none"):
        load_profile("cpu", "torch", path, CPU_FP32)


def test_numpy_nnls_matches_scipy():
    from scipy.optimize import nnls

    rng = np.random.default_rng(0)
    for _ in range(100):
        rows, cols = rng.integers(3, 40), rng.integers(1, 18)
        a = rng.normal(size=(rows, cols)) * rng.uniform(0.01, 100, size=cols)
        b = rng.normal(size=rows)
        x, residual = nnls_numpy(a, b)
        expected, expected_residual = nnls(a, b)
        assert (x >= 0).all()
        assert residual <= expected_residual + 1e-7 * max(1.0, np.linalg.norm(b))


def test_cli_refuses_cuda_without_a_gpu_in_one_line(capsys):
    from tfcompile.cli import main

    assert main(["calibrate", "--target", "h100", "--backend", "torch", "--device", "cuda", "--mode", "graphs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: no CUDA device here" in err
    assert main(["calibrate", "--target", "h100", "--backend", "torch", "--precision", "bf16"]) == 2
    assert "calibrating h100 needs that device" in capsys.readouterr().err
    assert main(["calibrate", "--backend", "ort", "--precision", "bf16"]) == 2
    assert "needs --backend torch" in capsys.readouterr().err


def test_cli_calibrates_then_compare_uses_the_profile_for_those_options(tmp_path, monkeypatch, capsys):
    from tfcompile.cli import main

    monkeypatch.setenv("TFCOMPILE_PROFILE_DIR", str(tmp_path / "profiles"))
    monkeypatch.setattr(calibrate_device, "device_suite", lambda device: device_suite(device, TINY_SIZES))
    # Three held-out kernels say little about the fit; the check itself is tested in test_calibration.
    monkeypatch.setattr("tfcompile.cost_models.calibration.improves_on_roofline", lambda profile: True)
    assert main(["calibrate", "--backend", "torch", "--precision", "bf16", "--repeat", "3"]) == 0
    saved = tmp_path / "profiles" / "cpu-torch-cpu-eager-bf16.json"
    assert json.loads(saved.read_text())["torch_precision"] == "bf16"
    assert "calibration cpu/torch cpu eager bf16" in capsys.readouterr().out
    out = tmp_path / "cmp"
    assert main(["compare", "tests.tiny:bert", "--backend", "torch", "--precision", "bf16", "--seqs", "16",
                 "--repeat", "3", "-o", str(out)]) == 0
    assert "calibrated" in json.loads((out / "compare.json").read_text())["scores"]
    assert main(["compare", "tests.tiny:bert", "--backend", "torch", "--precision", "fp16", "--seqs", "16",
                 "--repeat", "3", "-o", str(tmp_path / "cmp16")]) == 0
    assert "no calibration profile for cpu/torch cpu eager fp16" in capsys.readouterr().out


@pytest.mark.slow  # 25-41 s: the whole benchmark script (make test-slow)
def test_gpu_check_cpu_dry_run_prints_the_whole_table_without_scipy(tmp_path):
    """The dry run end to end, with SciPy made unimportable as on a GPU machine without it."""
    report = tmp_path / "gpu_check.json"
    script = ("import runpy, sys; sys.modules['scipy'] = None; "
              f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--quick', '--json', {str(report)!r}]; "
              f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_check.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    for section in ("(a) calibration", "(b) compare", "(c) premerge_ffn crossover", "padding removal"):
        assert section in result.stdout
    data = json.loads(report.read_text())
    assert all("fit_mape" in c for c in data["calibration"].values())
    measured = [r for r in data["rows"] if r["measured_ms"]]
    assert len(measured) >= 20 and {r["variant"] for r in measured} == {"baseline", "cleanup+merge_qkv"}
    assert {r["precision"] for r in measured} == {"fp32", "bf16"} and all(r["ok"] for r in measured)
    assert {"calibrated", "roofline", "flops_only"} <= set(data["scores"]["all"])
    assert data["scores"]["all"]["roofline"]["n"] == len(measured)
    crossover = data["premerge_ffn_crossover"]
    assert len(crossover["rows"]) == 5 and "measured" in crossover["crossover_tokens"]
    padding = data["padding"]
    assert not padding["refused_forms"]
    forms = {"per-length", "varlen", "varlen-rt"}
    for run in padding["runs"]:  # every packed form ran, matched its reference and was timed against padded
        assert not run["failed"] and set(run["measured_speedup"]) == forms
        assert all(run["max_rel_err"][k] <= run["tolerance"][k] for k in forms)
    assert {run["precision"] for run in padding["runs"]} == {"fp32", "fp16"}
