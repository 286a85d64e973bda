"""compare's --device/--mode/--precision (issue 24): torch on cpu or cuda, in a mode, at a precision, in process."""

import json

import pytest
import torch

from tfcompile import cli as cli_module
from tfcompile.backends import torch_device
from tfcompile.cli import main
from tfcompile.cli_options import TORCH_DEVICES, TORCH_MODES, TORCH_PRECISIONS


@pytest.fixture
def narrow(monkeypatch, capsys):
    monkeypatch.setattr(cli_module.console, "width", 80)  # the width a pipe gets without $COLUMNS
    capsys.readouterr()
    return capsys


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    return lines[0]


def test_the_choices_are_torch_devices():
    assert TORCH_DEVICES == torch_device.DEVICES and TORCH_MODES == torch_device.MODES
    assert TORCH_PRECISIONS == tuple(torch_device.PRECISIONS)


def test_compare_in_bf16_on_cpu_records_the_precision(tmp_path, narrow):
    out = tmp_path / "cmp"
    assert main(["compare", "tests.tiny:bert", "--backend", "torch", "--device", "cpu", "--precision", "bf16",
                 "--seqs", "16", "--repeat", "2", "-o", str(out)]) == 0
    printed = narrow.readouterr().out
    assert "torch cpu eager bf16" in printed and "base 1x16" in printed
    assert max(len(line) for line in printed.splitlines()) <= 80, printed
    report = json.loads((out / "compare.json").read_text())
    assert report["measured_with"] == {"backend": "torch", "device": "cpu", "mode": "eager", "precision": "bf16"}
    assert "bf16" in report["title"]
    assert len(report["variants"]) == 3 and all(v["measured_ms"] > 0 for v in report["variants"])
    assert "roofline" in report["scores"]


def test_defaults_are_torch_as_before(tmp_path, narrow):
    """--device cpu --mode eager --precision fp32 spelled out: the plain torch run, nothing recorded."""
    out = tmp_path / "cmp"
    assert main(["compare", "tests.tiny:bert", "--backend", "torch", "--device", "cpu", "--mode", "eager",
                 "--precision", "fp32", "--seqs", "8", "--repeat", "1", "-o", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert "measured_with" not in report and report["title"].endswith("(torch)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path, narrow):
    out = tmp_path / "cmp"
    assert main(["compare", "tests.tiny:bert", "--backend", "torch", "--device", "cuda", "-o", str(out)]) == 2
    assert "no CUDA device" in one_error_line(narrow)
    assert not out.exists()


@pytest.mark.parametrize("args, reason", [
    (["--precision", "bf16"], "needs --backend torch, not --backend ort"),
    (["--backend", "tvm", "--device", "cpu"], "needs --backend torch, not --backend tvm"),
    (["--backend", "torch", "--mode", "graphs", "--device", "cpu"], "needs --device cuda"),
    (["--backend", "torch", "--precision", "tf32"], "tensor-core format"),
])
def test_what_cannot_run_is_refused_before_any_work(tmp_path, narrow, args, reason):
    out = tmp_path / "cmp"
    assert main(["compare", "tests.tiny:bert", *args, "-o", str(out)]) == 2
    assert reason in one_error_line(narrow)
    assert not out.exists()


def test_a_cpu_target_with_cuda_is_refused(monkeypatch, tmp_path, narrow):
    monkeypatch.setattr(torch_device.torch.cuda, "is_available", lambda: True)
    out = tmp_path / "cmp"
    assert main(["compare", "tests.tiny:bert", "--backend", "torch", "--device", "cuda", "-o", str(out)]) == 2
    assert "give its --target" in one_error_line(narrow)


def test_each_input_set_runs_at_the_precision(tmp_path):
    from tests.tiny import load_tiny
    from tfcompile.measure import lower_torch_device, measure_here

    graph = load_tiny("bert-base", batch=1, seq=8)
    other = tuple(torch.randint_like(t, 0, 100) if not t.is_floating_point() else t for t in graph.example_inputs)
    runs = lower_torch_device(graph, [graph.example_inputs, other], device="cpu", mode="eager", precision="bf16")
    assert [low.label for low in runs] == ["torch cpu eager bf16"] * 2
    for low, inputs in zip(runs, [graph.example_inputs, other]):
        assert low.max_rel_err <= low.tolerance == torch_device.TOLERANCE["bf16"]
        reference = graph.run(inputs)[0]
        assert (low.outputs[0] - reference).abs().max() <= 0.05 * reference.abs().max()
    assert not torch.equal(runs[0].outputs[0], runs[1].outputs[0])
    timed = measure_here({"a": graph}, "torch", tmp_path, repeat=2, precision="fp16")
    assert timed["a"].measurement.median_s > 0 and timed["a"].measurement.backend == "torch cpu eager fp16"
    with pytest.raises(Exception, match="only for backend torch"):
        measure_here({"a": graph}, "ort", tmp_path, repeat=2, precision="bf16")


def test_optimize_measures_on_the_torch_device_and_records_it(tmp_path, narrow):
    """optimize --measure --backend torch --device cpu --mode compile: measured by torch_device, in run.toml."""
    out = tmp_path / "opt"
    assert main(["optimize", "tests.tiny:bert", "--backend", "torch", "--device", "cpu", "--mode", "compile",
                 "--measure", "--repeat", "3", "-o", str(out)]) == 0
    printed = narrow.readouterr().out
    assert "measured: torch cpu compile fp32 on" in printed
    report = json.loads((out / "report.json").read_text())
    measured = [v for v in report["variants"] if v.get("measured_ms")]
    assert len(measured) >= 2 and all(v["backend"] == "torch cpu compile fp32" for v in measured)
    run = (out / "run.toml").read_text()
    assert 'device = "cpu"' in run and 'mode = "compile"' in run


@pytest.mark.parametrize("args, reason", [
    (["--backend", "torch", "--precision", "bf16", "--measure"], "a precision is a variant the search weighs"),
    (["--generate", "--prompt-len", "8", "--new-tokens", "2", "--backend", "torch", "--mode", "compile"],
     "--mode does not apply to --generate"),
    (["--target", "h100", "--measure"], "measuring on h100 needs that device"),
])
def test_optimize_refuses_device_options_it_cannot_honour(tmp_path, narrow, args, reason):
    out = tmp_path / "opt"
    model = "tiny-decoder" if "--generate" in args else "tests.tiny:bert"
    assert main(["optimize", model, *args, "-o", str(out)]) == 2
    assert reason in one_error_line(narrow)
    assert not out.exists()
