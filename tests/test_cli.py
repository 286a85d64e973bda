"""The command line as a user runs it: a real subprocess per call."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from tests.tiny import load_tiny, tiny_module

REPO = pathlib.Path(__file__).resolve().parents[1]


def tfcompile(*args, cwd=REPO, columns=None):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "tfcompile.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


def assert_clean_failure(result, match, out_dir):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert match in lines[0]
    assert not out_dir.exists() or not any(out_dir.iterdir())


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


def test_missing_file(tmp_path):
    out = tmp_path / "out"
    result = tfcompile("optimize", str(tmp_path / "nope.pt"), "-o", str(out))
    assert_clean_failure(result, "no such file", out)


def test_random_bytes_as_onnx(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(bytes(range(256)) * 64)
    out = tmp_path / "out"
    assert_clean_failure(tfcompile("optimize", str(model), "-o", str(out)), "not a recognised model file", out)


def test_truncated_pt2(tmp_path):
    graph = load_tiny("gpt2-small")
    full = tmp_path / "full.pt2"
    torch.export.save(torch.export.export(tiny_module("gpt2-small"), graph.example_inputs), str(full))
    cut = tmp_path / "model.pt2"
    cut.write_bytes(full.read_bytes()[:-4096])
    out = tmp_path / "out"
    assert_clean_failure(tfcompile("optimize", str(cut), "-o", str(out)), "truncated or corrupt", out)


def test_unknown_target(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(tfcompile("optimize", "gpt2-small", "--target", "tpu9", "-o", str(out)),
                         "unknown target 'tpu9'", out)


def test_pickle_without_flag(tmp_path):
    model = tmp_path / "model.pt"
    torch.save(Net(), model)
    out = tmp_path / "out"
    result = tfcompile("optimize", str(model), "--input-shape", "x=2x4:float32", "-o", str(out))
    assert_clean_failure(result, "--trust-pickle", out)


@pytest.mark.slow  # builds full-size gpt2-small first; twin: test_shape_that_does_not_fit_a_tiny_model
def test_shape_that_does_not_fit(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(tfcompile("optimize", "gpt2-small", "--seq", "5000", "-o", str(out)),
                         "exceeds the model's 1024 positions", out)


def test_shape_that_does_not_fit_a_tiny_model(tmp_path, capsys):
    """Fast twin of test_shape_that_does_not_fit: a 2-layer GPT-2 directory (128 positions), in this process."""
    from tfcompile.cli import main

    tiny_module("gpt2-small").model.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "out"
    assert main(["optimize", str(tmp_path / "gpt2"), "--seq", "5000", "-o", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "exceeds the model's 128 positions" in lines[0]
    assert not out.exists()


def test_existing_output_survives_a_failed_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"old": true}')
    result = tfcompile("optimize", "gpt2-small", "--target", "tpu9", "-o", str(out))
    assert result.returncode != 0
    assert json.loads((out / "report.json").read_text()) == {"old": True}


def test_optimize_measures_ranks_and_writes_report(tmp_path):
    out = tmp_path / "out"
    result = tfcompile("optimize", "tests.tiny:bert", "--target", "cpu", "--measure", "--measure-top", "2",
                       "--repeat", "3", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "meas ms" in result.stdout and "p10-p90" in result.stdout
    # Piped output is laid out for 80 columns, and says what the figures rest on.
    assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout
    assert "predicted: roofline" in result.stdout and "measured: ort on " in result.stdout
    report = json.loads((out / "report.json").read_text())
    import jsonschema

    from tfcompile.report import schema

    jsonschema.validate(report, schema())
    assert report["host"]["cores"] >= 1 and report["versions"]["onnxruntime"]
    assert report["inputs"][0]["shape"] == [1, 16]
    for v in report["variants"]:
        if "measured_ms" in v:
            spread = v["measured_spread"]
            assert spread["runs"] == 3 and spread["low"] <= spread["p10"] <= spread["median"] <= spread["p90"]
            assert v["vs_baseline"]["median"] > 0
    names = [v["name"] for v in report["variants"]]
    assert {"baseline", "cleanup", "cleanup+merge_qkv_projections"} <= set(names)
    assert report["best"] == names[0]
    measured = [v for v in report["variants"] if "measured_ms" in v]
    assert len(measured) == 3  # the baseline and the two best predicted variants
    assert "baseline" in {v["name"] for v in measured}
    assert names[: len(measured)] == [v["name"] for v in measured]  # measured variants rank first
    for v in report["variants"]:
        assert {"name", "passes", "exact", "predicted_ms", "max_rel_err", "flops", "bytes"} <= set(v)
        assert set(v["predicted_ms"]) >= {"a100", "h100", "cpu", "npu", "edge"}
        assert v["max_rel_err"] <= 1e-4
    for v in measured:
        assert v["backend"] == "ort" and v["measured_ms"] > 0
    assert report["refusals"]["layernorm_to_rmsnorm"].startswith("not a Pre-LN stream: Post-LN")
    assert (out / "model.onnx").stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_explain_says_why(tmp_path):
    # Wide enough that no reason wraps inside its cell.
    result = tfcompile("optimize", "tests.tiny:gpt2", "--explain", "-o", str(tmp_path / "out"), columns=200)
    assert result.returncode == 0, result.stderr
    assert "projections are already fused" in result.stdout
    assert "give --lengths" in result.stdout


def test_passes_and_targets_listings():
    passes = tfcompile("passes")
    assert passes.returncode == 0 and "merge_qkv_projections" in passes.stdout and "exact" in passes.stdout
    targets = tfcompile("targets")
    assert targets.returncode == 0
    for name in ("a100", "h100", "cpu", "npu", "edge"):
        assert name in targets.stdout


def test_export_refuses_an_atol_the_check_cannot_meet(tmp_path):
    # A written export, its opset and the shapes it is checked at: backends/test_dynamic_export.py.
    # float32 rounding is far above 1e-12 absolute: the check refuses, and nothing is written.
    strict = tmp_path / "strict.onnx"
    result = tfcompile("export", "tests.tiny:gpt2", "-o", str(strict), "--atol", "1e-12")
    assert_clean_failure(result, "--atol", tmp_path / "none")
    assert not strict.exists()


def test_unknown_pass_is_a_clean_error(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(tfcompile("optimize", "tests.tiny:gpt2", "--passes", "warp_drive", "-o", str(out)),
                         "unknown pass 'warp_drive'", out)


@pytest.mark.slow  # the whole micro-benchmark suite, two CLI subprocesses; twin: ..._in_process
def test_calibrate_then_compare(tmp_path):
    env_dir = tmp_path / "profiles"
    profile = env_dir / "cpu-torch.json"
    result = tfcompile("calibrate", "--backend", "torch", "--repeat", "3", "-o", str(profile))
    assert result.returncode == 0, result.stderr
    data = json.loads(profile.read_text())
    assert data["version"] == 1 and data["backend"] == "torch" and len(data["samples"]) >= 20
    out = tmp_path / "cmp"
    result = tfcompile("compare", "tests.tiny:bert", "--backend", "torch", "--profile", str(profile),
                       "--seqs", "16,32", "--repeat", "3", "--rounds", "2", "-o", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "compare.json").read_text())
    assert len(report["variants"]) == 6
    assert {"calibrated", "roofline", "flops_only"} <= set(report["scores"])
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_calibrate_then_compare_in_process(tmp_path, monkeypatch, capsys):
    """Fast twin of test_calibrate_then_compare: the same commands in this process, on every 4th micro-benchmark."""
    from tfcompile.cli import main
    from tfcompile import calibrate as microbench

    from tfcompile.cost_models import calibration

    suite = microbench.default_suite()[::4]
    monkeypatch.setattr(microbench, "default_suite", lambda: suite)
    # Three held-out kernels out of twelve say little; the check itself is tested in test_calibration.
    monkeypatch.setattr(calibration, "improves_on_roofline", lambda profile: True)
    profile = tmp_path / "profiles" / "cpu-torch.json"
    assert main(["calibrate", "--backend", "torch", "--repeat", "3", "-o", str(profile)]) == 0
    data = json.loads(profile.read_text())
    assert data["version"] == 1 and data["backend"] == "torch"
    assert [s["name"] for s in data["samples"]] == [b.name for b in suite]
    assert data["probe_gemm_flops_per_s"] > 1e9 and data["probe_read_bytes_per_s"] > 0.5e9  # the host's speed
    out = tmp_path / "cmp"
    capsys.readouterr()
    from tfcompile import cli as cli_module

    monkeypatch.setattr(cli_module.console, "width", 80)  # the width a pipe gets without $COLUMNS
    assert main(["compare", "tests.tiny:bert", "--backend", "torch", "--profile", str(profile), "--seqs", "16",
                 "--repeat", "3", "--rounds", "2", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    # Rows under the plot's labels, the key under the table, nothing wider than the 80-column default.
    assert "v1 1x16" in printed and "base 1x16" in printed and "  v1  cleanup" in printed
    assert max(len(line) for line in printed.splitlines()) <= 80, printed
    report = json.loads((out / "compare.json").read_text())
    assert len(report["variants"]) == 3
    # Probed around the measurement, against the speed the profile recorded at calibration.
    assert set(report["host_speed"]["ratio_to_calibration"]) == {"gemm_flops_per_s", "read_bytes_per_s"}
    assert {"calibrated", "roofline", "flops_only"} <= set(report["scores"])
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_calibrating_a_remote_target_is_refused(tmp_path):
    result = tfcompile("calibrate", "--target", "a100")
    assert result.returncode == 2 and "only 'cpu'" in result.stderr and "Traceback" not in result.stderr


def test_optimize_uses_a_saved_calibration_profile(tmp_path, monkeypatch):
    from tfcompile.cost_models.calibration import CLASSES, Profile, save_profile

    profile_dir = tmp_path / "profiles"
    monkeypatch.setenv("TFCOMPILE_PROFILE_DIR", str(profile_dir))
    # A profile where every kernel costs exactly 1 ms makes the prediction checkable.
    save_profile(Profile(target="cpu", backend="ort", s_per_flop={c: 0.0 for c in CLASSES},
                         s_per_byte={c: 0.0 for c in CLASSES}, kernel_overhead_s=1e-3, graph_overhead_s=0.0))
    out = tmp_path / "out"
    result = tfcompile("optimize", "tests.tiny:bert", "--target", "cpu", "-o", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    for variant in report["variants"]:
        assert variant["prediction"] == "calibrated cpu/ort"
        assert variant["predicted_ms"]["cpu"] == pytest.approx(round(variant["predicted_ms"]["cpu"]))
    baseline = next(v for v in report["variants"] if v["name"] == "baseline")
    assert baseline["predicted_ms"]["cpu"] > 10  # one ms per unfused kernel


def test_edge_export_with_int8_is_checked_against_torch(tmp_path):
    out = tmp_path / "out"
    result = tfcompile("optimize", "tests.tiny:bert", "--target", "edge", "--quantize", "int8", "--budget", "0.99",
                       "-o", str(out))
    assert result.returncode == 0, result.stderr
    export = json.loads((out / "report.json").read_text())["export"]
    assert export["quantize"] == "int8" and export["exact"] is False and export["quality"] >= 0.99
    import onnx
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "DynamicQuantizeLinear" in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert len(session.get_inputs()) == 2


@pytest.mark.slow  # twin: test_hostile_commands.py::test_quantize_below_budget_after_the_search_writes_nothing
def test_quantization_below_budget_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = tfcompile("optimize", "tests.tiny:bert", "--target", "npu", "--quantize", "int8",
                       "--budget", "0.99999999", "-o", str(out))
    assert_clean_failure(result, "below --budget", out)


@pytest.mark.slow  # a search of full-size minilm; twin: test_lengths_make_padding_removal_win_on_a_tiny_encoder
def test_lengths_make_padding_removal_win(tmp_path):
    out = tmp_path / "out"
    result = tfcompile("optimize", "minilm", "--batch", "3", "--seq", "32", "--lengths", "32,7,19", "-o", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    best = next(v for v in report["variants"] if v["name"] == report["best"])
    # Either form of padding removal: the lengths-specialised one (which checks its mask at run time) or the
    # run-time one, whichever the cost model prices lower here.
    assert {"remove_padding", "remove_padding_runtime"} & set(best["passes"]) and best["max_rel_err"] <= 1e-5
    assert report["settings"]["lengths"] == [32, 7, 19]


def test_lengths_make_padding_removal_win_on_a_tiny_encoder(tmp_path):
    """Fast twin of the minilm run above: a 2-layer, hidden-64 mean-pooled BERT, the CLI in this process."""
    from tfcompile.cli import main

    out = tmp_path / "out"
    assert main(["optimize", "tests.tiny:mean_pooled_bert", "--batch", "3", "--seq", "32", "--lengths", "32,7,19",
                 "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    best = next(v for v in report["variants"] if v["name"] == report["best"])
    # Either form of padding removal: the lengths-specialised one (which checks its mask at run time) or the
    # run-time one, whichever the cost model prices lower here.
    assert {"remove_padding", "remove_padding_runtime"} & set(best["passes"]) and best["max_rel_err"] <= 1e-5
    assert report["settings"]["lengths"] == [32, 7, 19]


def test_lengths_that_do_not_fit(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(tfcompile("optimize", "minilm", "--batch", "2", "--seq", "32", "--lengths", "40,3",
                                   "-o", str(out)), "longer than --seq", out)


def test_json_prints_the_report_and_quiet_prints_nothing(tmp_path, capsys):
    import jsonschema

    from tfcompile.cli import main
    from tfcompile.report import schema

    out = tmp_path / "out"
    assert main(["optimize", "tests.tiny:gpt2", "--json", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed)  # stdout is the report and nothing else
    assert report == json.loads((out / "report.json").read_text())
    jsonschema.validate(report, schema())
    # run.toml beside the report reruns the same run; the command line still wins (-o, --quiet).
    run_file = out / "run.toml"
    assert 'model = "tests.tiny:gpt2"' in run_file.read_text()
    assert main(["--run-config", str(run_file), "optimize", "--quiet", "-o", str(tmp_path / "quiet")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    again = json.loads((tmp_path / "quiet" / "report.json").read_text())
    assert again["best"] == report["best"] and again["settings"] == report["settings"]
    assert again["inputs"] == report["inputs"]


def test_calibration_data_needs_allow_approx_and_a_text_file(tmp_path, capsys):
    from tfcompile.cli import main

    sentences = tmp_path / "s.txt"
    sentences.write_text("a sentence\nanother one\n")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\x00\x01\xff" * 100)
    out = tmp_path / "out"
    for args, message in ((["--calibration-data", str(sentences)], "give --allow-approx too"),
                          (["--allow-approx", "--calibration-data", str(binary)], "--calibration-data"),
                          (["--allow-approx", "--calibration-data", str(tmp_path)], "--calibration-data")):
        assert main(["optimize", "tests.tiny:mean_pooled_bert", *args, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()
