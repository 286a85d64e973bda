"""Precision passes: int8 dynamic quantization and half precision, their preconditions and what the search picks.

Device specs are built here with and without the instructions (VNNI, AVX512_BF16) so every test
means the same on an AVX2 host, an AVX-512 host and CI.
"""

import dataclasses

import numpy as np
import pytest
import torch

from tests.tiny import load_tiny
from tfcompile.backends import ort
from tfcompile.cost_models.device import HostCpu, cpu_peaks, load_device
from tfcompile.optimize import OptimizeSettings, optimize
from tfcompile.passes import PassContext, apply_pass
from tfcompile.structure.precision import RELATIVE_TOLERANCE, graph_precision, quantize_activation, quantize_weight
from tfcompile.verify import compare_outputs

ARCHITECTURES = ["gpt2-small", "bert-base", "vit-base", "llama-tiny"]
AVX2 = frozenset({"avx", "avx2", "fma"})
AVX512_VNNI_BF16 = AVX2 | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}


def cpu_with(flags: frozenset[str], name: str) -> "DeviceSpec":  # noqa: F821
    """This project's cpu device file with the peaks a 2-core 3 GHz CPU with ``flags`` has."""
    host = HostCpu("test cpu", 2, 3e9, flags)
    return dataclasses.replace(load_device("cpu"), name=name, peak_flops=cpu_peaks(host), isa=flags)


def context(device, backend="ort") -> PassContext:
    return PassContext.build(device, backend, calibrated=False)


def test_cpu_peaks_follow_the_instructions():
    avx2, vnni = cpu_peaks(HostCpu("a", 2, 3e9, AVX2)), cpu_peaks(HostCpu("b", 2, 3e9, AVX512_VNNI_BF16))
    assert avx2["int8"] == avx2["fp32"] and avx2["bf16"] == avx2["fp32"] and avx2["fp16"] == avx2["fp32"]
    assert vnni["int8"] == 4 * vnni["fp32"] and vnni["bf16"] == 2 * vnni["fp32"] and vnni["fp16"] == vnni["fp32"]
    assert vnni["fp32"] == 2 * avx2["fp32"]  # 512-bit FMAs


def test_weight_quantization_is_symmetric_per_column():
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    weight[2] = 0.0
    q, zero_point, scale = quantize_weight(weight)
    assert q.dtype == torch.int8 and q.shape == (5, 6) and zero_point.abs().sum() == 0
    assert q.abs().amax(dim=0)[[0, 1, 3, 4, 5]].tolist() == [127] * 5  # each column's largest maps to 127
    assert torch.allclose(q.t().float() * scale[:, None], weight, atol=float(scale.max()) / 2 + 1e-7)


def test_activation_quantization_follows_onnx_dynamic_quantize_linear():
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    x = torch.tensor([[-1.3, 0.0, 0.7, 2.55, 0.01]])
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zero_point"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 5]),
                               helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
                               helper.make_tensor_value_info("zero_point", TensorProto.UINT8, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, scale, zero_point = session.run(None, {"x": x.numpy()})
    ours = quantize_activation(x)
    assert ours[0].to(torch.uint8).tolist() == y.tolist()
    assert float(ours[1]) == pytest.approx(float(scale), rel=1e-7) and int(ours[2]) == int(zero_point)
    assert onnx.checker.check_model(model) is None


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_int8_variant_runs_the_same_in_onnx_runtime_and_stays_close_to_fp32(name, tmp_path):
    graph = load_tiny(name)
    quantized, outcome = apply_pass(graph, "quantize_int8_dynamic", context(cpu_with(AVX512_VNNI_BF16, "vnni")))
    assert outcome.applied, outcome.reason
    assert graph_precision(quantized) == "int8" and graph_precision(graph) == "fp32"
    assert outcome.record.weight_bytes_after < outcome.record.weight_bytes_before / 3
    torch_out = quantized.run()
    quality = compare_outputs(graph.run(), torch_out, graph.output_names)
    assert quality.quality >= 0.99 and quality.max_rel_err > 0  # approximate, and close
    path = ort.export_onnx(quantized, tmp_path / "q.onnx")
    import onnx

    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    ort_out = ort.OrtModel(path).run(graph.example_inputs)
    agreement = compare_outputs(torch_out, ort_out, graph.output_names)
    assert agreement.max_rel_err <= RELATIVE_TOLERANCE["int8"]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_half_precision_keeps_fp32_inputs_and_outputs(name):
    graph = load_tiny(name)
    half, outcome = apply_pass(graph, "half_precision", context("h100"), dtype="fp16")
    assert outcome.applied, outcome.reason
    assert graph_precision(half) == "fp16"
    outputs = half.run()
    assert all(t.dtype == r.dtype for t, r in zip(outputs, graph.run()))
    assert compare_outputs(graph.run(), outputs, graph.output_names).max_rel_err <= RELATIVE_TOLERANCE["fp16"]


def test_rope_frequencies_stay_fp32_in_half_precision():
    graph = load_tiny("llama-tiny")
    half, _ = apply_pass(graph, "half_precision", context("h100"), dtype="fp16")
    buffers = {str(n.target): n.meta["val"].dtype for n in half.nodes("get_attr")}
    assert any("inv_freq" in name and dtype == torch.float32 for name, dtype in buffers.items())


@pytest.mark.parametrize("pass_name,knobs,device,backend,reason", [
    ("quantize_int8_dynamic", {}, cpu_with(AVX2, "avx2"), "ort", "no int8 dot-product instructions"),
    ("quantize_int8_dynamic", {}, cpu_with(AVX512_VNNI_BF16, "vnni"), "tvm", "tvm on a cpu has no int8 kernels"),
    ("quantize_int8_dynamic", {}, "h100", "ort", "ort on a gpu has no int8 kernels"),
    ("half_precision", {"dtype": "bf16"}, cpu_with(AVX512_VNNI_BF16, "vnni"), "ort", "ort on a cpu has no bf16"),
    ("half_precision", {"dtype": "bf16"}, cpu_with(AVX2, "avx2"), "torch", "no bf16 instructions"),
    ("half_precision", {"dtype": "fp16"}, cpu_with(AVX512_VNNI_BF16, "vnni"), "torch", "no fp16 instructions"),
    ("half_precision", {"dtype": "bf16"}, "h100", "ort", "ort on a gpu has no bf16 kernels"),
])
def test_a_precision_that_would_not_run_faster_is_refused_with_the_reason(pass_name, knobs, device, backend,
                                                                           reason):
    graph = load_tiny("bert-base")
    same, outcome = apply_pass(graph, pass_name, context(device, backend), **knobs)
    assert not outcome.applied and same is graph
    assert reason in outcome.reason


def test_bf16_applies_on_a_cpu_with_avx512_bf16_for_torch():
    graph = load_tiny("bert-base")
    half, outcome = apply_pass(graph, "half_precision", context(cpu_with(AVX512_VNNI_BF16, "vnni"), "torch"),
                               dtype="bf16")
    assert outcome.applied and graph_precision(half) == "bf16"


# Wide enough that arithmetic, not kernel launches, sets a GPU's time (hidden 64 is launch-bound there).
MID_BERT = dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, intermediate_size=1024, vocab_size=512)


def _best(device, budget=0.99):
    from tfcompile.frontend import LoadOptions, load_model

    graph = load_model("bert-base", LoadOptions(config_overrides=MID_BERT, batch=4, seq=128))
    result = optimize(graph, OptimizeSettings(target=device.name if not isinstance(device, str) else device,
                                              device=None if isinstance(device, str) else device,
                                              allow_approx=True, budget=budget))
    result.cleanup()
    best = next(r for r in result.reports if r.name == result.best)
    return best, result


def test_the_search_picks_half_precision_on_a_gpu_and_follows_the_cpus_instructions():
    gpu, _ = _best("edge")
    assert "half_precision" in gpu.passes and gpu.quality >= 0.99
    vnni, _ = _best(cpu_with(AVX512_VNNI_BF16, "vnni"))
    assert "quantize_int8_dynamic" in vnni.passes and vnni.quality >= 0.99
    avx2, result = _best(cpu_with(AVX2, "avx2"))
    assert not {"quantize_int8_dynamic", "half_precision"} & set(avx2.passes)
    assert "no int8 dot-product instructions" in result.refusals["quantize_int8_dynamic"]
    # A budget the quantized model cannot meet keeps fp32 on the VNNI CPU too.
    strict, _ = _best(cpu_with(AVX512_VNNI_BF16, "vnni"), budget=0.999999)
    assert "quantize_int8_dynamic" not in strict.passes


def test_dynamic_export_of_an_int8_variant_is_checked_at_every_shape(tmp_path):
    from tfcompile.backends.dynamic_export import export_variant_onnx
    from tfcompile.frontend import LoadOptions, load_model
    from tfcompile.frontend.zoo import TINY_CONFIGS
    from tfcompile.variants import VariantSpec, build_variant

    graph = load_model("bert-base", LoadOptions(config_overrides=TINY_CONFIGS["bert-base"], batch=2, seq=16))
    ctx = context(cpu_with(AVX512_VNNI_BF16, "vnni"))
    variant = build_variant(graph, VariantSpec("int8", ("quantize_int8_dynamic",)), ctx)
    deployed = export_variant_onnx(variant, tmp_path / "model.onnx", original=graph, context=ctx)
    assert deployed.static_reason is None and len(deployed.checks) >= 4
    assert all(check.max_rel_err <= RELATIVE_TOLERANCE["int8"] for check in deployed.checks)
    assert np.isfinite([check.max_rel_err for check in deployed.checks]).all()
