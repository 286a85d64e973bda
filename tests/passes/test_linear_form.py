"""matmul_to_linear: an ONNX input's MatMul + Add linears read as aten.linear, so the linear passes apply."""

import pytest

from tests.tiny import load_tiny
from tfcompile.backends.ort import export_onnx
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.passes import apply_pass
from tfcompile.verify import compare_outputs


def _from_onnx(name, tmp_path):
    graph = load_tiny(name, batch=2, seq=16)
    path = export_onnx(graph, tmp_path / f"{name}.onnx")
    return load_model(str(path), LoadOptions(batch=2, seq=16))


@pytest.mark.parametrize("name,layers", [("bert-base", 2), ("llama-tiny", 2)])
def test_onnx_linears_become_aten_linear_and_the_projection_merge_applies(name, layers, tmp_path):
    imported = _from_onnx(name, tmp_path)
    merged, refused = apply_pass(imported, "merge_qkv_projections")
    assert not refused.applied  # as imported: MatMul + Add, no aten.linear to merge

    linear, outcome = apply_pass(imported, "matmul_to_linear")
    assert outcome.applied, outcome.reason
    assert not any(n.target.__name__.startswith("matmul") and n.args[1].op == "get_attr"
                   for n in linear.call_nodes() if hasattr(n.target, "__name__"))
    check = compare_outputs(imported.run(), linear.run(), imported.output_names)
    assert check.max_rel_err <= 1e-5  # exact up to float rounding

    merged, outcome = apply_pass(linear, "merge_qkv_projections")
    assert outcome.applied, outcome.reason
    def linears(graph):
        return sum(str(n.target) == "aten.linear.default" for n in graph.call_nodes())

    assert linears(merged) <= linears(linear) - 2 * layers  # q, k, v (and gate, up) became one GEMM per layer
    assert compare_outputs(imported.run(), merged.run(), imported.output_names).max_rel_err <= 1e-5


def test_biases_are_taken_into_the_linear(tmp_path):
    imported = _from_onnx("bert-base", tmp_path)
    linear, outcome = apply_pass(imported, "matmul_to_linear")
    assert outcome.applied and "with their bias" in outcome.reason
    with_bias = [n for n in linear.call_nodes() if str(n.target) == "aten.linear.default" and len(n.args) == 3]
    assert len(with_bias) == 12  # 2 layers x (q, k, v, out, up, down)


def test_a_torch_traced_model_is_left_alone():
    graph = load_tiny("bert-base")
    same, outcome = apply_pass(graph, "matmul_to_linear")
    assert not outcome.applied and same is graph
    assert "already aten.linear" in outcome.reason
