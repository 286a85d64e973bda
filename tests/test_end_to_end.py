"""The spine's promise at full size: `tfcompile optimize` on every zoo model and
on a .pt2 and an .onnx file written by torch, measured with ORT and TVM.

Slow (minutes per model on 2 cores): run with `make test-slow`.
"""

import json

import pytest
import torch

from tests.test_cli import tfcompile

pytestmark = pytest.mark.slow

ZOO = ["gpt2-small", "bert-base", "vit-base", "llama-tiny", "minilm", "tiny-decoder"]


def _check_report(out, backend):
    report = json.loads((out / "report.json").read_text())
    assert report["best"]
    measured = [v for v in report["variants"] if "measured_ms" in v]
    assert {"baseline", report["best"]} <= {v["name"] for v in measured}
    for variant in measured:
        assert variant["backend"] == backend and variant["measured_ms"] > 0
    for variant in report["variants"]:
        assert variant["max_rel_err"] <= 1e-4
    assert report["export"]["max_rel_err"] <= 1e-4  # model.onnx in ONNX Runtime against torch
    assert (out / "model.onnx").stat().st_size > 0
    return report


@pytest.mark.parametrize("backend", ["ort", "tvm"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model(tmp_path, name, backend):
    out = tmp_path / "out"
    result = tfcompile("optimize", name, "--target", "cpu", "--measure", "--measure-top", "1", "--backend", backend,
                       "--repeat", "3", "--seq", "128", "-o", str(out))
    assert result.returncode == 0, result.stderr
    _check_report(out, backend)


@pytest.fixture(scope="module")
def torch_written_files(tmp_path_factory):
    from tfcompile.frontend import zoo

    folder = tmp_path_factory.mktemp("files")
    module = zoo.build("bert-base")
    ids = torch.randint(0, 30522, (1, 128), generator=torch.Generator().manual_seed(0))
    args = (ids, torch.ones_like(ids))
    torch.export.save(torch.export.export(module, args), str(folder / "bert.pt2"))
    torch.onnx.export(module, args, str(folder / "bert.onnx"), dynamo=True,
                      input_names=["input_ids", "attention_mask"])
    return folder


@pytest.mark.parametrize("backend", ["ort", "tvm"])
@pytest.mark.parametrize("filename", ["bert.pt2", "bert.onnx"])
def test_torch_written_file(tmp_path, torch_written_files, filename, backend):
    out = tmp_path / "out"
    result = tfcompile("optimize", str(torch_written_files / filename), "--target", "cpu", "--measure",
                       "--measure-top", "1", "--backend", backend, "--repeat", "3", "-o", str(out))
    assert result.returncode == 0, result.stderr
    _check_report(out, backend)
