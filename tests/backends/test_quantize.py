import onnx
import pytest

from tfcompile.backends import ort
from tfcompile.backends.quantize import quantize
from tfcompile.errors import BackendError
from tfcompile.verify import compare_outputs
from tests.tiny import load_tiny


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    graph = load_tiny("bert-base", batch=1, seq=16)
    return graph, ort.export_onnx(graph, tmp_path_factory.mktemp("q") / "model.onnx")


@pytest.mark.parametrize("mode,op", [("int8", "DynamicQuantizeLinear"), ("fp16", "Cast")])
def test_quantized_model_runs_and_stays_close(tmp_path, exported, mode, op):
    graph, path = exported
    out = quantize(path, tmp_path / f"{mode}.onnx", mode)
    assert op in {n.op_type for n in onnx.load(str(out)).graph.node}
    check = compare_outputs(graph.run(), ort.OrtModel(out).run(graph.example_inputs))
    assert check.quality > 0.999
    assert check.max_rel_err > 0  # it really changed the arithmetic


def test_unknown_mode(tmp_path, exported):
    with pytest.raises(BackendError, match="unknown quantization"):
        quantize(exported[1], tmp_path / "x.onnx", "int4")
