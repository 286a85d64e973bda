"""Hostile and broken inputs through the command line: no code runs, one line, exit 2, nothing written.

The CLI runs in-process (``tfcompile.cli.main``) so that torch is imported
once; stderr and the exit status are what a shell would see. Every hostile
file is generated here (see ``hostile.py``); every payload would create a
marker file if it ran.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
import torch

from tfcompile.cli import main
from tfcompile.frontend import LoadOptions, load_model
from tests.frontend.hostile import (WEIGHTS_CONFIG, Pt2Edit, pickle_payload,
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
    from tfcompile.cost_models.device import device_file

    crafted = tmp_path / "mine.toml"
    crafted.write_text(_device_toml())
    devices = device_file("cpu").resolve().parent
    relative = Path("../" * len(devices.parts)) / str(crafted.with_suffix("")).lstrip("/")
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


# --- options out of range ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,match", [
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--batch", "0"], "--batch"),
    (["--seq", "-5"], "--seq"),
    (["--batch", "1000000000000"], "--batch '1000000000000': every size must be from 1 to"),
    (["--batch", "4096", "--seq", str(10**6)], "more than the"),
    (["--batch", "1..3,x"], "--batch"),
    (["--seq", "64..16"], "--seq"),
    (["--config", "/nonexistent/config.json"], "--config"),
    (["--config", "/"], "is a directory"),
    (["--input-shape", "nosuch=1x16:int64"], "--input-shape names nosuch, but the model's inputs are input_ids"),
    (["--no-such-option"], "No such option"),
])
def test_options_out_of_range(args, match, tmp_path, capsys):
    out = tmp_path / "out"
    marker = tmp_path / MARKER
    assert_refused(run_cli(capsys, "optimize", "gpt2-small", *args, "-o", out), match=match, marker=marker,
                   output=out)


@pytest.mark.parametrize("args,match", [
    (["--budget", "2.0"], "--budget"),
    (["--budget", "-1"], "--budget"),
    (["--budget", "nan"], "--budget"),
    (["--repeat", "0"], "--repeat"),
    (["--measure-top", "-1"], "--measure-top"),
])
def test_optimize_values_out_of_range(args, match, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(run_cli(capsys, "optimize", "tests.tiny:bert", *args, "-o", out), match=match,
                   marker=tmp_path / MARKER, output=out)


def test_optimize_output_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    existing = tmp_path / "report-here"
    existing.write_text("earlier output")
    code, lines, everything = run_cli(capsys, "optimize", "tests.tiny:bert", "-o", existing)
    assert code == EXIT_USER_ERROR and len(lines) == 1 and "is a file" in lines[0], everything
    assert existing.read_text() == "earlier output"
    below = existing / "out"
    code, lines, everything = run_cli(capsys, "optimize", "tests.tiny:bert", "-o", below)
    assert code == EXIT_USER_ERROR and len(lines) == 1 and "no directory can be made" in lines[0], everything


def test_absurd_input_shape_is_refused_before_allocating(clean_pt2, tmp_path, capsys):
    out = tmp_path / "out"
    result = run_cli(capsys, "optimize", clean_pt2, "--input-shape", "x=1000000x1000000000:float32", "-o", out)
    assert_refused(result, match="more than the", marker=tmp_path / MARKER, output=out)


def test_input_shape_naming_no_input_of_the_model(clean_pt2, tmp_path, capsys):
    out = tmp_path / "out"
    result = run_cli(capsys, "optimize", clean_pt2, "--input-shape", "input_ids=2x4:int64", "-o", out)
    assert_refused(result, match="the model's inputs are x", marker=tmp_path / MARKER, output=out)


def test_seed_out_of_range_through_the_library():
    from tfcompile.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="--seed"):
        load_model("gpt2-small", LoadOptions(seed=2**64))


@pytest.mark.parametrize("source,options,match", [
    (None, LoadOptions(), "model None"),
    (b"gpt2-small", LoadOptions(), "model b'gpt2-small'"),
    ("", LoadOptions(), "model ''"),
    ("gpt2-small", None, "load options None"),
    ("gpt2-small", {"batch": 1}, "load options"),
])
def test_library_callers_get_a_clear_error_for_wrong_types(source, options, match):
    from tfcompile.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match=match):
        load_model(source, options)


# --- factories: the user's own code, whatever it does, ends in one line ------------------------------------

FACTORIES = '''
import torch

class Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x

class ReturnsNothing(torch.nn.Module):
    def forward(self, x):
        return None

def branchy():
    return Branchy(), (torch.randn(2, 4),)

def forward_returns_none():
    return ReturnsNothing(), (torch.randn(2, 4),)

def raises():
    raise RuntimeError("weights server down")

def needs_args(path):
    return torch.nn.Linear(2, 2)

def returns_none():
    return None

def inputs_that_do_not_fit():
    return torch.nn.Linear(4, 2), (torch.randn(2, 3),)

def exits():
    raise SystemExit(3)
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch) -> str:
    name = f"hostile_factories_{uuid.uuid4().hex}"  # a fresh name: Python caches imported modules by name
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    (tmp_path / f"{name}_syntax.py").write_text("def broken(:\n")
    (tmp_path / f"{name}_import_raises.py").write_text("raise ValueError('import boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.parametrize("factory,match", [
    ("{m}:raises", "the factory raised RuntimeError: weights server down"),
    ("{m}:needs_args", "the factory needs arguments"),
    ("{m}:returns_none", "returned NoneType, not an nn.Module"),
    ("{m}:exits", "the factory raised SystemExit"),
    ("{m}:no_such_factory", "has no attribute 'no_such_factory'"),
    ("{m}_syntax:broken", "syntax error"),
    ("{m}_import_raises:anything", "raised ValueError: import boom"),
    ("no_such_module_xyz:factory", "no module named 'no_such_module_xyz'"),
    ("{m}:forward_returns_none", "forward returns NoneType"),
    ("{m}:branchy", "--input-shape"),
    ("{m}:inputs_that_do_not_fit", "could not trace"),
])
def test_factory_failures(factory, match, factory_module, tmp_path, capsys):
    out = tmp_path / "out"
    result = run_cli(capsys, "optimize", factory.format(m=factory_module), "-o", out)
    assert_refused(result, match=match, marker=tmp_path / MARKER, output=out)


# --- weights that do not fit, damaged checkpoints, configs that name no model -------------------------------

@pytest.fixture
def tiny_gpt2_dir(tmp_path) -> Path:
    from tests.tiny import tiny_module

    model_dir = tmp_path / "gpt2"
    tiny_module("gpt2-small").model.save_pretrained(model_dir)
    return model_dir


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def _safetensors_file(model_dir: Path) -> Path:
    return next(model_dir.glob("*.safetensors"))


@pytest.mark.parametrize("damage,match", [
    ("weights-of-another-size", "not a loadable Hugging Face model directory"),
    ("truncated-safetensors", "not a loadable Hugging Face model directory"),
    ("garbage-safetensors", "not a loadable Hugging Face model directory"),
    ("architectures-not-a-model", "not a transformers model class"),
    ("config-not-json", "not a usable Hugging Face config"),
    ("negative-layer-count", "has weights that the config has no place for"),
    ("fewer-layers-than-weights", "has weights that the config has no place for"),
    ("more-layers-than-weights", "has no weights for"),
])
def test_damaged_hf_directory(damage, match, tiny_gpt2_dir, tmp_path, capsys):
    weights = _safetensors_file(tiny_gpt2_dir)
    if damage == "weights-of-another-size":
        _edit_config(tiny_gpt2_dir, n_embd=128)
    elif damage == "truncated-safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage-safetensors":
        weights.write_bytes(bytes(range(256)) * 16)
    elif damage == "architectures-not-a-model":
        _edit_config(tiny_gpt2_dir, architectures=["pipeline"])
    elif damage.endswith("-layers-than-weights") or damage == "negative-layer-count":
        # transformers would drop the extra weights, or draw the missing ones at random, with a warning.
        _edit_config(tiny_gpt2_dir, n_layer={"negative-layer-count": -1, "fewer-layers-than-weights": 1,
                                             "more-layers-than-weights": 3}[damage])
    else:
        (tiny_gpt2_dir / "config.json").write_text("{not json")
    out = tmp_path / "out"
    assert_refused(run_cli(capsys, "optimize", tiny_gpt2_dir, "-o", out), match=match, marker=tmp_path / MARKER,
                   output=out)


def test_state_dict_that_does_not_fit_its_config(tiny_gpt2_dir, tmp_path, capsys):
    from tests.tiny import tiny_module

    weights = tmp_path / "weights.pt"
    torch.save(tiny_module("gpt2-small").model.state_dict(), weights)
    config = tmp_path / "config.json"
    config.write_text((tiny_gpt2_dir / "config.json").read_text())
    _edit_config(tmp_path, n_embd=128)
    out = tmp_path / "out"
    assert_refused(run_cli(capsys, "optimize", weights, "--config", config, "-o", out), match="does not fit",
                   marker=tmp_path / MARKER, output=out)


# --- valid inputs that used to crash ------------------------------------------------------------------------

def test_dynamic_pt2_loads_with_static_shapes(tmp_path):
    """Symbolic dimensions reached the cost model and the report (SymFloat format error); re-traced static now."""
    graph = load_model(str(save_clean_pt2(tmp_path / "dynamic.pt2", dynamic=True)))
    for node in graph.gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            assert all(isinstance(d, int) for d in value.shape), node


def test_traced_torchscript_loads_with_static_shapes(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.trace(module, torch.randn(3, 8)), str(path))
    graph = load_model(str(path))
    assert all(isinstance(d, int) for n in graph.gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)
               for d in n.meta["val"].shape)
    x = torch.randn(3, 8)
    torch.testing.assert_close(graph.run((x,))[0], module(x))


# --- a small fuzz: truncations and bit flips with a fixed seed ----------------------------------------------

def _mutations(data: bytes, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    mutated = []
    for i in range(count):
        if i % 2 == 0:
            mutated.append(data[: rng.randrange(1, len(data))])
        else:
            flipped = bytearray(data)
            for _ in range(rng.randrange(1, 8)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            mutated.append(bytes(flipped))
    return mutated


def _torchscript_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(torch.nn.Linear(4, 2), torch.randn(1, 4)), buffer)
    return buffer.getvalue()


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"weight": torch.randn(4, 4), "bias": torch.randn(4)})


@pytest.mark.parametrize("kind", ["pt2", "torchscript", "safetensors"])
def test_fuzzed_model_files_load_or_fail_in_one_line(kind, clean_pt2, tmp_path):
    """Whatever the damage, the result is a model or a TfcompileError: no other exception, no code run."""
    from tfcompile.errors import TfcompileError

    original = {"pt2": clean_pt2.read_bytes, "torchscript": _torchscript_bytes,
                "safetensors": _safetensors_bytes}[kind]()
    path = tmp_path / "model.bin"
    for data in _mutations(original, count=16, seed=22):
        path.write_bytes(data)
        try:
            load_model(str(path), LoadOptions(input_shapes={"x": (2, 4)}, input_dtypes={"x": torch.float32}))
        except TfcompileError as exc:
            assert "\n" not in str(exc)


def test_factory_that_never_returns_stops_at_the_timeout(tmp_path, monkeypatch, capsys):
    name = f"hangs_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text("def forever():\n    while True:\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    result = run_cli(capsys, "optimize", f"{name}:forever", "--timeout", "1", "-o", out)
    assert_refused(result, match="took longer than 1 s", marker=tmp_path / MARKER, output=out)


def test_trusted_pickle_of_a_class_from_main_says_what_is_missing(tmp_path, capsys):
    """A class defined in the saving script's __main__ cannot be found when tfcompile unpickles it."""
    script = tmp_path / "save.py"
    script.write_text("import sys, torch\n"
                      "class Net(torch.nn.Module):\n"
                      "    def forward(self, x):\n"
                      "        return x * 2\n"
                      "torch.save(Net(), sys.argv[1])\n")
    model = tmp_path / "model.pt"
    subprocess.run([sys.executable, str(script), str(model)], check=True, timeout=120)
    out = tmp_path / "out"
    result = run_cli(capsys, "optimize", model, "--trust-pickle", "--input-shape", "x=2x4:float32", "-o", out)
    assert_refused(result, match="module:factory", marker=tmp_path / MARKER, output=out)


@pytest.mark.parametrize("args,match", [
    (["export", "gpt2-small", "-o", "{tmp}/newdir/"], "is a directory"),
    (["export", "gpt2-small", "-o", "{tmp}"], "is a directory"),
    (["compare", "gpt2-small", "--repeat", "0", "-o", "{tmp}/out"], "--repeat"),
    (["compare", "gpt2-small", "--profile", "{tmp}/missing.json", "-o", "{tmp}/out"], "--profile"),
    (["calibrate", "--repeat", "0", "-o", "{tmp}/out/p.json"], "--repeat"),
    (["tune", "gpt2-small", "--trials", "0", "--database", "{tmp}/out"], "--trials"),
])
def test_other_commands_refuse_bad_values_in_one_line(args, match, tmp_path, capsys):
    code, lines, everything = run_cli(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert code == EXIT_USER_ERROR and len(lines) == 1 and match in lines[0], everything
    assert not (tmp_path / "out").exists() and not (tmp_path / "newdir").exists()


def test_hf_config_naming_remote_code_runs_and_asks_nothing(tiny_gpt2_dir, tmp_path, capsys):
    """auto_map names code in the directory: never imported, and no trust prompt on stdout."""
    marker = tmp_path / MARKER
    (tiny_gpt2_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    _edit_config(tiny_gpt2_dir, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    out = tmp_path / "out"
    result = run_cli(capsys, "optimize", tiny_gpt2_dir, "-o", out)
    assert_refused(result, match="names custom model code (auto_map)", marker=marker, output=out)
    assert result[2].strip() == result[1][0]  # stdout is empty: nothing asked, nothing printed


# --- hub ids: names in the local Hugging Face cache, never paths; a cached snapshot is a model directory -------

HUB_ID = "tiny-org/tiny-gpt2"


@pytest.fixture
def hub_snapshot(tiny_gpt2_dir, tmp_path, monkeypatch) -> Path:
    """HF_HUB_CACHE holding the tiny GPT-2 as tiny-org/tiny-gpt2; returns its snapshot. The cwd holds nothing."""
    from tests.frontend.test_hub_cache import write_hub_cache

    cache = tmp_path / "hub"
    snapshot = write_hub_cache(cache, HUB_ID, tiny_gpt2_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return snapshot


def _replace_cached_file(snapshot: Path, name: str, data: bytes | None) -> None:
    """A cached file's content changed as a cache entry would hold it: the snapshot's link to a new blob."""
    link = snapshot / name
    if link.is_symlink() or link.exists():
        link.unlink()
    if data is not None:
        blob = snapshot.parent.parent / "blobs" / f"edited-{name}"
        blob.write_bytes(data)
        link.symlink_to(Path("..", "..", "blobs", blob.name))


@pytest.mark.parametrize("source", ["../tiny-org/tiny-gpt2", "tiny-org/../tiny-org/tiny-gpt2", "tiny-org\\tiny-gpt2",
                                    "/tiny-org/tiny-gpt2", "tiny-org//tiny-gpt2", "models--tiny-org--tiny-gpt2"])
def test_hub_id_that_is_a_path_never_reaches_the_cache(source, hub_snapshot, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("a path reached the hub cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    out = tmp_path / "out"
    assert_refused(run_cli(capsys, "optimize", source, "-o", out), match="nor a Hugging Face hub id",
                   marker=tmp_path / MARKER, output=out)


def test_cached_snapshot_with_a_pickled_checkpoint_runs_nothing(hub_snapshot, tmp_path, capsys):
    """No safetensors, a pytorch_model.bin whose pickle writes a file: refused as in a directory, nothing runs."""
    marker = tmp_path / MARKER
    _replace_cached_file(hub_snapshot, "model.safetensors", None)
    _replace_cached_file(hub_snapshot, "pytorch_model.bin", torch_save_payload(marker))
    out = tmp_path / "out"
    assert_refused(run_cli(capsys, "optimize", HUB_ID, "-o", out), match="weights-only unpickler", marker=marker,
                   output=out)


@pytest.mark.parametrize("damage,match", [
    ("auto_map", "names custom model code (auto_map)"),
    ("weights-of-another-size", "not a loadable Hugging Face model directory"),
    ("more-layers-than-weights", "has no weights for"),
    ("no-config", "needs a config.json"),
])
def test_cached_snapshot_gets_the_directory_checks(damage, match, hub_snapshot, tmp_path, capsys):
    marker = tmp_path / MARKER
    config = json.loads((hub_snapshot / "config.json").read_text())
    if damage == "auto_map":
        _replace_cached_file(hub_snapshot, "evil.py", f"open({str(marker)!r}, 'w').close()\n".encode())
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    else:
        config.update({"weights-of-another-size": {"n_embd": 128}, "more-layers-than-weights": {"n_layer": 3}}
                      .get(damage, {}))
    _replace_cached_file(hub_snapshot, "config.json", None if damage == "no-config" else json.dumps(config).encode())
    out = tmp_path / "out"
    assert_refused(run_cli(capsys, "optimize", HUB_ID, "-o", out), match=match, marker=marker, output=out)


@pytest.mark.parametrize("ref", ["../../models--other--repo/snapshots/" + "0" * 40, "../../../elsewhere",
                                 "../../../../../../../../etc"])
def test_cached_ref_pointing_out_of_the_snapshots_is_refused(ref, hub_snapshot, tiny_gpt2_dir, tmp_path, capsys):
    """snapshot_download joins refs/main onto snapshots/ as it is: a ref may name any folder."""
    from tests.frontend.test_hub_cache import write_hub_cache

    write_hub_cache(hub_snapshot.parents[2], "other/repo", tiny_gpt2_dir, commit="0" * 40)
    write_hub_cache(tmp_path / "elsewhere-cache", "x", tiny_gpt2_dir)
    (tmp_path / "elsewhere").symlink_to(next((tmp_path / "elsewhere-cache").glob("*/snapshots/*")))
    (hub_snapshot.parents[1] / "refs" / "main").write_text(ref)
    out = tmp_path / "out"
    assert_refused(run_cli(capsys, "optimize", HUB_ID, "-o", out), match="not a commit of snapshots/",
                   marker=tmp_path / MARKER, output=out)


def test_cached_file_linking_out_of_the_cache_is_refused(hub_snapshot, tiny_gpt2_dir, tmp_path, capsys):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(_safetensors_file(tiny_gpt2_dir).read_bytes())
    (hub_snapshot / "model.safetensors").unlink()
    (hub_snapshot / "model.safetensors").symlink_to(outside)
    out = tmp_path / "out"
    assert_refused(run_cli(capsys, "optimize", HUB_ID, "-o", out), match="outside the model's cache folder",
                   marker=tmp_path / MARKER, output=out)
