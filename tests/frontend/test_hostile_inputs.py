"""Hostile and broken inputs through the command line: no code runs, one line, exit 2, nothing written.

The CLI runs in-process (``tfcompile.cli.main``) so that torch is imported
once; stderr and the exit status are what a shell would see. Every hostile
file is generated here (see ``hostile.py``); every payload would create a
marker file if it ran.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from tfcompile.cli import main
from tfcompile.frontend import LoadOptions, load_model
from tests.frontend.hostile import (CONSTANTS_CONFIG, WEIGHTS_CONFIG, Pt2Edit, TinyNet, pickle_payload,
                                    pt2_cases, replace_members, save_clean_pt2, torch_save_payload)

EXIT_USER_ERROR = 2
MARKER = "code-ran"


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory) -> Path:
    return save_clean_pt2(tmp_path_factory.mktemp("clean") / "model.pt2")


def run_cli(capsys, *args: str) -> tuple[int, list[str], str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    return code, lines, captured.err + captured.out


def assert_refused(result, *, match: str, marker: Path, output: Path) -> None:
    code, lines, everything = result
    assert not marker.exists(), "the payload ran"
    assert code == EXIT_USER_ERROR, everything
    assert "Traceback" not in everything
    assert len(lines) == 1, everything
    assert match in lines[0], lines[0]
    assert not output.exists(), "a failed run wrote output"


# --- torch.export archives: a payload in every kind of member torch.export.load reads -----------------

PT2_CASES = list(pt2_cases(Path("unused")))
# The payloads torch.export.load (2.13) runs by itself: each is shown live against plain torch.
LIVE_UNDER_PLAIN_TORCH = {
    "sample-inputs-raw-pickle", "sample-inputs-torch-save-zip", "weight-marked-use-pickle",
    "constant-marked-use-pickle", "legacy-weights-file", "legacy-constants-file", "shape-expression-eval",
}


@pytest.mark.parametrize("case", sorted(LIVE_UNDER_PLAIN_TORCH))
def test_payload_runs_under_plain_torch_export_load(case, clean_pt2, tmp_path):
    """Control: these files really do run code when torch reads them unchecked."""
    marker = tmp_path / MARKER
    crafted = pt2_cases(marker)[case].apply(clean_pt2, tmp_path / "model.pt2")
    try:
        torch.export.load(str(crafted))
    except Exception:  # torch fails after the payload ran; only the marker matters
        pass
    assert marker.exists()


@pytest.mark.parametrize("case", PT2_CASES)
def test_pt2_payload_in_any_member_runs_nothing(case, clean_pt2, tmp_path, capsys):
    marker = tmp_path / MARKER
    crafted = pt2_cases(marker)[case].apply(clean_pt2, tmp_path / "model.pt2")
    out = tmp_path / "out"
    result = run_cli(capsys, "optimize", crafted, "--target", "cpu", "-o", out)
    assert_refused(result, match=str(crafted), marker=marker, output=out)


@pytest.mark.parametrize("case", ["sample-inputs-raw-pickle", "weight-marked-use-pickle", "opaque-object-constant"])
def test_pt2_pickle_refusal_names_the_member_and_the_flag(case, clean_pt2, tmp_path, capsys):
    marker = tmp_path / MARKER
    crafted = pt2_cases(marker)[case].apply(clean_pt2, tmp_path / "model.pt2")
    code, lines, _ = run_cli(capsys, "export", crafted, "-o", tmp_path / "model.onnx")
    assert code == EXIT_USER_ERROR and len(lines) == 1
    assert "--trust-pickle" in lines[0] and "archive member model/data/" in lines[0]
    assert not marker.exists()


def test_pt2_payload_runs_only_with_the_flag(clean_pt2, tmp_path, capsys):
    """--trust-pickle is the consent: the same file's pickle is then unpickled as torch would."""
    marker = tmp_path / MARKER
    crafted = pt2_cases(marker)["sample-inputs-raw-pickle"].apply(clean_pt2, tmp_path / "model.pt2")
    code, lines, _ = run_cli(capsys, "optimize", crafted, "--trust-pickle", "-o", tmp_path / "out")
    assert marker.exists()
    assert code == EXIT_USER_ERROR and len(lines) == 1  # what came out of it is no exported program


def test_guards_code_is_never_compiled(tmp_path):
    """Guards are Python source torch compiles in program.module(), which a re-trace at new shapes calls.

    Dynamic exports carry guards, so they are dropped rather than refused.
    """
    marker = tmp_path / MARKER
    dynamic = save_clean_pt2(tmp_path / "dynamic.pt2", dynamic=True)
    crafted = Pt2Edit(json_edits={"models/model.json": lambda d: d.update(
        guards_code=[f"open({str(marker)!r}, 'w') is not None"])}).apply(dynamic, tmp_path / "model.pt2")
    torch.export.load(str(crafted)).module()(torch.randn(3, 4))  # control: live under plain torch
    assert marker.exists()
    marker.unlink()
    graph = load_model(str(crafted), LoadOptions(input_shapes={"x": (5, 4)}, input_dtypes={"x": torch.float32}))
    graph.run()
    assert not marker.exists()


def test_clean_archive_loads_without_the_flag(clean_pt2):
    reference = torch.export.load(str(clean_pt2))  # our own file: trusted
    graph = load_model(str(clean_pt2))
    torch.testing.assert_close(graph.run()[0], reference.module()(*graph.example_inputs))


def test_tensor_only_pickled_members_load_without_the_flag(clean_pt2, tmp_path):
    """Pickled members that hold only tensors go through the weights-only unpickler: no flag needed."""
    reference = torch.export.load(str(clean_pt2))
    weight = reference.state_dict["fc.weight"]
    buffer = io.BytesIO()
    torch.save(torch.nn.Parameter(weight.detach().clone()), buffer)

    def pickled_weight(document):
        document["config"]["fc.weight"]["use_pickle"] = True

    edited = Pt2Edit(replace={"data/weights/" + _path_name(clean_pt2, WEIGHTS_CONFIG, "fc.weight"):
                              buffer.getvalue()},
                     json_edits={WEIGHTS_CONFIG: pickled_weight}).apply(clean_pt2, tmp_path / "model.pt2")
    graph = load_model(str(edited))
    torch.testing.assert_close(graph.run()[0], reference.module()(*graph.example_inputs))


def _path_name(archive: Path, config: str, fqn: str) -> str:
    with zipfile.ZipFile(archive) as z:
        return json.loads(z.read(f"model/{config}"))["config"][fqn]["path_name"]


# --- TorchScript, torch.save and raw pickles -----------------------------------------------------------

class SavesOnLoad(torch.nn.Module):
    """TorchScript runs __setstate__ while loading the archive; this one writes a file from there."""

    def __init__(self, marker: str):
        super().__init__()
        self.weight = torch.ones(2)
        self.marker = marker

    def forward(self, x):
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.weight = state[0]
        self.marker = state[1]
        self.training = state[2]
        torch.save(self.weight, self.marker)


def test_torchscript_code_that_writes_files_is_not_loaded(tmp_path, capsys):
    marker = tmp_path / MARKER
    path = tmp_path / "model.pt"
    torch.jit.script(SavesOnLoad(str(marker))).save(str(path))
    assert not marker.exists()
    out = tmp_path / "out"
    assert_refused(run_cli(capsys, "optimize", path, "-o", out), match="calls save", marker=marker, output=out)


@pytest.mark.parametrize("member", ["data.pkl", "constants.pkl"])
def test_torchscript_pickle_payload_runs_nothing(member, tmp_path, capsys):
    marker = tmp_path / MARKER
    clean = io.BytesIO()
    torch.jit.save(torch.jit.trace(torch.nn.Linear(4, 2), torch.randn(1, 4)), clean)
    path = tmp_path / "model.pt"
    path.write_bytes(replace_members(clean.getvalue(), lambda name: name.endswith("/" + member),
                                     lambda _data: pickle_payload(marker)))
    out = tmp_path / "out"
    assert_refused(run_cli(capsys, "optimize", path, "-o", out), match=str(path), marker=marker, output=out)


@pytest.mark.parametrize("kind", ["raw-pickle", "torch-save-zip"])
def test_pickle_files_need_the_flag(kind, tmp_path, capsys):
    marker = tmp_path / MARKER
    path = tmp_path / "model.pt"
    path.write_bytes(pickle_payload(marker) if kind == "raw-pickle" else torch_save_payload(marker))
    out = tmp_path / "out"
    assert_refused(run_cli(capsys, "optimize", path, "-o", out), match="--trust-pickle", marker=marker, output=out)


def test_hf_directory_with_a_pickled_checkpoint_runs_nothing(tmp_path, capsys):
    """transformers reads pytorch_model.bin with weights_only=True; tfcompile reports the refusal in one line."""
    from tests.tiny import tiny_module

    marker = tmp_path / MARKER
    model_dir = tmp_path / "gpt2"
    tiny_module("gpt2-small").model.config.save_pretrained(model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(torch_save_payload(marker))
    out = tmp_path / "out"
    assert_refused(run_cli(capsys, "optimize", model_dir, "-o", out), match=str(model_dir), marker=marker,
                   output=out)


# --- --target is a name from the device folder, never a path --------------------------------------------

def _device_toml(**overrides) -> str:
    fields = {"name": '"mine"', "description": '"a device"', "kind": '"gpu"', "mem_bandwidth_gbps": "100",
              "kernel_overhead_us": "5"}
    fields.update(overrides)
    lines = [f"{k} = {v}" for k, v in fields.items() if v is not None]
    return "\n".join(lines) + ("\n[peak_tflops]\nfp32 = 10.0\n[efficiency]\n"
                               "gemm = 0.5\nattention = 0.5\nmemory = 0.5\nnorm = 0.5\nsoftmax = 0.5\n")


@pytest.mark.parametrize("target", ["../../../../../../etc/passwd", "/etc/passwd", "cpu/../cpu", "cpu.toml",
                                    "CPU", "", "devices/cpu"])
def test_target_is_a_name_not_a_path(target, tmp_path, capsys):
    out = tmp_path / "out"
    code, lines, everything = run_cli(capsys, "optimize", "gpt2-small", "--target", target, "-o", out)
    assert code == EXIT_USER_ERROR and "Traceback" not in everything
    assert len(lines) == 1 and "unknown target" in lines[0] and "known targets: a100, cpu" in lines[0]
    assert not out.exists()


def test_target_path_to_a_valid_device_file_is_refused(tmp_path, capsys):
    """A well-formed TOML outside the device folder is refused too: it is never read."""
    from tfcompile.cost_models.device import _devices_dir

    crafted = tmp_path / "mine.toml"
    crafted.write_text(_device_toml())
    relative = Path("../" * len(_devices_dir().resolve().parts)) / str(crafted.with_suffix("")).lstrip("/")
    code, lines, _ = run_cli(capsys, "calibrate", "--target", str(relative), "-o", tmp_path / "p.json")
    assert code == EXIT_USER_ERROR and len(lines) == 1 and "unknown target" in lines[0]
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("overrides,field", [
    ({"kind": None}, "field kind must be one of"),
    ({"kind": '"tpu"'}, "field kind must be one of"),
    ({"mem_bandwidth_gbps": '"fast"'}, "field mem_bandwidth_gbps must be a number > 0; found str 'fast'"),
    ({"mem_bandwidth_gbps": "0"}, "field mem_bandwidth_gbps must be a number > 0"),
    ({"kernel_overhead_us": "true"}, "field kernel_overhead_us must be a number >= 0; found bool True"),
    ({"kernel_overhead_us": "nan"}, "field kernel_overhead_us must be a number >= 0"),
    ({"name": "3"}, "field name must be a non-empty string"),
])
def test_device_file_fields_are_checked_one_by_one(overrides, field, tmp_path):
    from tfcompile.cost_models.device import device_from_toml
    from tfcompile.errors import DeviceSpecError

    path = tmp_path / "mine.toml"
    path.write_text(_device_toml(**overrides))
    with pytest.raises(DeviceSpecError) as caught:
        device_from_toml(path)
    assert field in str(caught.value) and "\n" not in str(caught.value)


def test_device_file_efficiency_and_toml_errors(tmp_path):
    from tfcompile.cost_models.device import device_from_toml
    from tfcompile.errors import DeviceSpecError

    path = tmp_path / "mine.toml"
    path.write_text(_device_toml().replace("softmax = 0.5", "softmax = 1.5"))
    with pytest.raises(DeviceSpecError, match=r"field efficiency.softmax must be a number > 0 and <= 1"):
        device_from_toml(path)
    path.write_text(_device_toml().replace("softmax = 0.5\n", ""))
    with pytest.raises(DeviceSpecError, match=r"field efficiency.softmax must be .*; found missing"):
        device_from_toml(path)
    path.write_text("name = \n")
    with pytest.raises(DeviceSpecError, match="not valid TOML"):
        device_from_toml(path)
    path.write_text(_device_toml())
    assert device_from_toml(path).kind == "gpu"
