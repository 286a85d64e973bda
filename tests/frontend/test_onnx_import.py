"""ONNX import: HF models from torch's exporters, single ops against ONNX Runtime, errors.

Every imported module is checked three ways on the same inputs: against ONNX
Runtime running the .onnx file, against the original torch model where there is
one, and after torch.export (the project's IR) against eager.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.export.graph_signature import InputKind

from tfcompile.errors import ModelLoadError, ShapeError
from tfcompile.frontend.onnx_import import import_onnx

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-4
VOCAB = 100


class _Wrapper(nn.Module):
    """Positional tensors in, tuple of tensors out, as the exporters and tfcompile expect."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], **kwargs):
        super().__init__()
        self.model, self.names, self.kwargs = model, names, kwargs

    def forward(self, *tensors):
        return (self.model(**dict(zip(self.names, tensors)), **self.kwargs)[0],)


def _ids_and_mask(batch=1, seq=8):
    return torch.randint(0, VOCAB, (batch, seq)), torch.ones(batch, seq, dtype=torch.long)


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg), ("input_ids",), {"use_cache": False}


def _bert():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    return transformers.BertModel(cfg), ("input_ids", "attention_mask"), {}


def _vit():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, image_size=16, patch_size=4, num_labels=5)
    return transformers.ViTForImageClassification(cfg), ("pixel_values",), {}


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg), ("input_ids", "attention_mask"), {"use_cache": False}


ARCHS = {"gpt2": _gpt2, "bert": _bert, "vit": _vit, "llama": _llama}


def _wrapped(arch: str) -> tuple[_Wrapper, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model, names, kwargs = ARCHS[arch]()
    wrapper = _Wrapper(model.eval(), names, **kwargs).eval()
    if arch == "vit":
        return wrapper, (torch.randn(1, 3, 16, 16),)
    return wrapper, _ids_and_mask()[: len(names)]


def _export(wrapper, args, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, str(path), input_names=list(wrapper.names), verbose=False, **kwargs)
    return onnx.load(str(path))


def _ort(model_or_path, names, inputs) -> list[torch.Tensor]:
    is_proto = isinstance(model_or_path, onnx.ModelProto)
    src = model_or_path.SerializeToString() if is_proto else str(model_or_path)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})]


def _assert_rel(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    assert err < REL_TOL, f"{what}: max relative error {err:.2e}"


def _check_against(imported, path, inputs, reference=None) -> None:
    with torch.no_grad():
        got = imported.module(*inputs)
        ref = reference(*inputs) if reference is not None else None
    for i, expected in enumerate(_ort(path, imported.input_names, inputs)):
        _assert_rel(got[i], expected, f"output {i} vs onnxruntime")
        if ref is not None:
            _assert_rel(got[i], ref[i], f"output {i} vs torch")


def _check_export(imported, strict: bool = False) -> torch.export.ExportedProgram:
    ep = torch.export.export(imported.module, imported.example_inputs, strict=strict)
    with torch.no_grad():
        for a, b in zip(ep.module()(*imported.example_inputs), imported.module(*imported.example_inputs)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    return ep


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hf_model_from_dynamo_exporter(arch, tmp_path):
    wrapper, args = _wrapped(arch)
    path = tmp_path / f"{arch}.onnx"
    imported = import_onnx(_export(wrapper, args, path, dynamo=True))

    assert imported.input_names == list(wrapper.names)
    assert [tuple(t.shape) for t in imported.example_inputs] == [tuple(a.shape) for a in args]
    if arch != "vit":  # token ids cover the embedding table, not just {0, 1}
        assert 2 <= imported.example_inputs[0].max() < VOCAB
    ep = _check_export(imported)
    kinds = {s.kind for s in ep.graph_signature.input_specs}
    assert InputKind.PARAMETER in kinds and InputKind.USER_INPUT in kinds
    _check_against(imported, path, imported.example_inputs, wrapper)

    if "attention_mask" in wrapper.names:  # the mask path is computed at runtime, not folded
        ids, mask = imported.example_inputs
        mask = mask.clone()
        mask[:, -3:] = 0
        _check_against(imported, path, (ids, mask), wrapper)


def test_dynamic_dynamo_export_is_specialised(tmp_path):
    wrapper, _ = _wrapped("bert")
    dyn = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    path = tmp_path / "bert_dyn.onnx"
    model = _export(wrapper, _ids_and_mask(2, 8), path, dynamo=True, dynamic_shapes=((dyn, dyn),))
    assert any(d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim)

    imported = import_onnx(model, batch=3, seq=12)
    assert [tuple(t.shape) for t in imported.example_inputs] == [(3, 12), (3, 12)]
    _check_export(imported)
    _check_against(imported, path, imported.example_inputs, wrapper)


def test_legacy_exporter_with_input_shapes(tmp_path):
    wrapper, args = _wrapped("bert")
    path = tmp_path / "bert_legacy.onnx"
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}}
    model = _export(wrapper, args, path, dynamo=False, opset_version=17, dynamic_axes=axes)
    assert "Shape" in {n.op_type for n in model.graph.node}  # shape arithmetic to fold

    imported = import_onnx(model, input_shapes={"input_ids": (2, 16), "attention_mask": (2, 16)})
    assert [tuple(t.shape) for t in imported.example_inputs] == [(2, 16), (2, 16)]
    _check_export(imported, strict=True)  # forward reads no tensor data, so dynamo can trace it
    _check_against(imported, path, imported.example_inputs, wrapper)


# -- single ops against ONNX Runtime, to pin per-opset semantics ----------------------

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, outputs, inits=None, opset=18):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(name, t, shape) for name, (t, shape) in inputs.items()],
        [helper.make_tensor_value_info(name, t, None) for name, t in outputs.items()],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)  # the checker wants output shapes


def _i64(*v):
    return np.array(v, dtype=np.int64)


N = helper.make_node
OP_CASES = {
    "slice_negative_steps": _model(
        [N("Slice", ["x", "st", "en", "ax", "sp"], ["y"])], {"x": (F32, [4, 6])}, {"y": F32},
        {"st": _i64(3, -1), "en": _i64(0, -100), "ax": _i64(0, 1), "sp": _i64(-1, -2)}, opset=13),
    "softmax_opset11_coerces_2d": _model(
        [N("Softmax", ["x"], ["y"])], {"x": (F32, [2, 3, 4])}, {"y": F32}, opset=11),
    "reduce_sum_axes_attribute": _model(
        [N("ReduceSum", ["x"], ["y"], axes=[1], keepdims=0)], {"x": (F32, [2, 3, 4])}, {"y": F32}, opset=11),
    "reduce_mean_default_all_axes": _model(
        [N("ReduceMean", ["x"], ["y"])], {"x": (F32, [2, 3, 4])}, {"y": F32}, opset=18),
    "split_num_outputs_uneven": _model(
        [N("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)], {"x": (F32, [2, 7])},
        {"a": F32, "b": F32, "c": F32}),
    "pad_reflect": _model(
        [N("Pad", ["x", "p"], ["y"], mode="reflect")], {"x": (F32, [1, 2, 4, 5])}, {"y": F32},
        {"p": _i64(0, 0, 1, 2, 0, 0, 2, 1)}),
    "conv_same_upper_stride2": _model(
        [N("Conv", ["x", "w", "b"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])],
        {"x": (F32, [1, 2, 8, 7])}, {"y": F32},
        {"w": np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32),
         "b": np.arange(3, dtype=np.float32)}),
    "cumsum_exclusive_reverse": _model(
        [N("CumSum", ["x", "a"], ["y"], exclusive=1, reverse=1)], {"x": (F32, [3, 5])}, {"y": F32},
        {"a": np.array(1, dtype=np.int64)}),
    "gemm_transA_alpha_beta": _model(
        [N("Gemm", ["a", "b", "c"], ["y"], transA=1, alpha=0.5, beta=2.0)],
        {"a": (F32, [4, 3]), "b": (F32, [4, 5])}, {"y": F32}, {"c": np.ones((1, 5), np.float32)}),
    "trilu_lower_k": _model(
        [N("Trilu", ["x", "k"], ["y"], upper=0)], {"x": (F32, [2, 4, 4])}, {"y": F32},
        {"k": np.array(-1, dtype=np.int64)}),
    "gathernd_batch_dims": _model(
        [N("GatherND", ["x", "indices"], ["y"], batch_dims=1)],
        {"x": (F32, [2, 3, 4]), "indices": (I64, [2, 2, 1])}, {"y": F32}),
    "gather_negative_scalar": _model(
        [N("Gather", ["x", "i"], ["y"], axis=1)], {"x": (F32, [2, 5, 3])}, {"y": F32},
        {"i": np.array(-1, dtype=np.int64)}),
    "topk": _model(
        [N("TopK", ["x", "k"], ["v", "i"])], {"x": (F32, [3, 6])}, {"v": F32, "i": I64}, {"k": _i64(2)}),
    "expand_bidirectional": _model(
        [N("Expand", ["x", "s"], ["y"])], {"x": (F32, [3, 1])}, {"y": F32}, {"s": _i64(2, 1, 4)}),
    "where_scalar_branch": _model(
        [N("Greater", ["x", "zero"], ["c"]), N("Where", ["c", "ninf", "x"], ["y"])],
        {"x": (F32, [2, 5])}, {"y": F32},
        {"zero": np.array(0, np.float32), "ninf": np.array(-np.inf, np.float32)}),
    "int_div_truncates": _model(
        [N("Sub", ["x", "seven"], ["d"]), N("Div", ["d", "two"], ["y"])], {"x": (I64, [2, 3])}, {"y": I64},
        {"seven": np.array(7, np.int64), "two": np.array(2, np.int64)}),
    "shape_arithmetic_folds": _model(
        [N("Shape", ["x"], ["s"]), N("Gather", ["s", "one"], ["n"]), N("Range", ["zero", "n", "one"], ["r"]),
         N("Cast", ["r"], ["rf"], to=F32), N("Add", ["x", "rf"], ["y"])],
        {"x": (F32, ["b", "s"])}, {"y": F32},
        {"zero": np.array(0, np.int64), "one": np.array(1, np.int64)}),
    "layernorm_extra_outputs": _model(
        [N("LayerNormalization", ["x", "g", "b"], ["y", "m", "r"], axis=-1, epsilon=1e-3)],
        {"x": (F32, [2, 3, 4])}, {"y": F32, "m": F32, "r": F32},
        {"g": np.linspace(0.5, 2, 4, dtype=np.float32), "b": np.ones(4, np.float32)}, opset=17),
    "argmax_select_last": _model(
        [N("Round", ["x"], ["r"]), N("ArgMax", ["r"], ["y"], axis=1, keepdims=0, select_last_index=1)],
        {"x": (F32, [3, 6])}, {"y": I64}),
    # Inputs that later opsets turned from attributes into (constant) inputs.
    "clip_opset10_attributes": _model(
        [N("Clip", ["x"], ["y"], min=-0.2, max=0.3)], {"x": (F32, [3, 4])}, {"y": F32}, opset=10),
    "clip_min_input_only": _model(
        [N("Clip", ["x", "lo"], ["y"])], {"x": (F32, [3, 4])}, {"y": F32},
        {"lo": np.array(-0.5, np.float32)}),
    "slice_opset9_attributes": _model(
        [N("Slice", ["x"], ["y"], starts=[1], ends=[1000], axes=[1])], {"x": (F32, [3, 5])}, {"y": F32},
        opset=9),
    "squeeze_unsqueeze_opset11": _model(
        [N("Squeeze", ["x"], ["s"], axes=[-2]), N("Unsqueeze", ["s"], ["y"], axes=[0, 3])],
        {"x": (F32, [1, 3, 1, 4])}, {"y": F32}, opset=11),
    "unsqueeze_negative_axes": _model(
        [N("Unsqueeze", ["x", "a"], ["y"])], {"x": (F32, [3, 4])}, {"y": F32}, {"a": _i64(-1, 0, 2)}),
    "split_opset11_equal": _model(
        [N("Split", ["x"], ["a", "b"], axis=0)], {"x": (F32, [4, 3])}, {"a": F32, "b": F32}, opset=11),
    "softmax_opset11_axis2": _model(
        [N("Softmax", ["x"], ["y"], axis=2)], {"x": (F32, [2, 3, 4])}, {"y": F32}, opset=11),
    "reduce_max_opset13_attribute": _model(
        [N("ReduceMax", ["x"], ["y"], axes=[-1])], {"x": (F32, [2, 3, 4])}, {"y": F32}, opset=13),
    # dtype rules torch does not share.
    "pow_int_base_float_exponent": _model(
        [N("Pow", ["x", "e"], ["y"])], {"x": (I64, [2, 3])}, {"y": I64}, {"e": np.array(3.0, np.float32)}),
    "int32_sum_and_cumsum_stay_int32": _model(
        [N("Cast", ["x"], ["c"], to=TensorProto.INT32), N("ReduceSum", ["c", "a"], ["s"]),
         N("CumSum", ["s", "a"], ["y"])], {"x": (I64, [2, 3])}, {"y": TensorProto.INT32}, {"a": _i64(-1)}),
    # Gathers from initializers: negative constant ids must not take the embedding path.
    "gather_table_negative_const_ids": _model(
        [N("Gather", ["w", "i"], ["g"]), N("Add", ["g", "x"], ["y"])], {"x": (F32, [2, 4])}, {"y": F32},
        {"w": np.arange(40, dtype=np.float32).reshape(10, 4), "i": _i64(1, -1)}),
    "gather_elements_negative": _model(
        [N("GatherElements", ["x", "i"], ["y"], axis=1)], {"x": (F32, [2, 4])}, {"y": F32},
        {"i": np.array([[-1, 0], [1, -2]], np.int64)}),
    "scatter_nd": _model(
        [N("ScatterND", ["x", "i", "u"], ["y"])], {"x": (F32, [4, 3]), "u": (F32, [2, 3])}, {"y": F32},
        {"i": _i64(3, 1).reshape(2, 1)}),
    "pad_edge_and_negative": _model(
        [N("Pad", ["x", "p"], ["e"], mode="edge"), N("Pad", ["e", "q"], ["y"])], {"x": (F32, [1, 2, 4, 5])},
        {"y": F32}, {"p": _i64(0, 0, 1, 2, 0, 0, 2, 1), "q": _i64(0, 0, -1, 0, 0, 0, 0, -2)}),
    "conv1d_groups_dilation": _model(
        [N("Conv", ["x", "w"], ["y"], group=2, pads=[1, 2], dilations=[2])], {"x": (F32, [1, 4, 9])},
        {"y": F32}, {"w": np.random.default_rng(1).standard_normal((4, 2, 3)).astype(np.float32)}),
    "pools_and_batchnorm": _model(
        [N("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"]),
         N("MaxPool", ["n"], ["p"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
         N("AveragePool", ["p"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         N("GlobalAveragePool", ["a"], ["y"])], {"x": (F32, [1, 3, 7, 7])}, {"y": F32},
        {"s": np.array([1.0, 0.5, 2.0], np.float32), "b": np.array([0.1, 0.0, -0.2], np.float32),
         "m": np.array([0.0, 0.3, -0.1], np.float32), "v": np.array([1.0, 0.5, 2.0], np.float32)}),
    "outputs_that_are_weights_or_constants": _model(
        [N("Identity", ["w"], ["a"]), N("Relu", ["x"], ["c"]),
         N("Constant", [], ["b"], value=numpy_helper.from_array(np.ones(2, np.float32)))],
        {"x": (F32, [2])}, {"a": F32, "b": F32, "c": F32}, {"w": np.arange(3, dtype=np.float32)}),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_single_op_matches_onnxruntime(case):
    model = OP_CASES[case]
    imported = import_onnx(model, batch=2, seq=6)
    with torch.no_grad():
        got = imported.module(*imported.example_inputs)
    expected = _ort(model, imported.input_names, imported.example_inputs)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    _check_export(imported)


# -- errors ---------------------------------------------------------------------------

def _identity(shape):
    return _model([N("Identity", ["x"], ["y"])], {"x": (F32, shape)}, {"y": F32})


def test_unsupported_ops_are_listed():
    model = _model([N("NonZero", ["x"], ["a"]), N("Unique", ["x"], ["y"])],
                   {"x": (F32, [4])}, {"a": I64, "y": F32})
    with pytest.raises(ModelLoadError, match="NonZero, Unique") as info:
        import_onnx(model)
    assert "\n" not in str(info.value)


def test_malformed_model_is_a_load_error():
    with pytest.raises(ModelLoadError, match="invalid ONNX model"):
        import_onnx(_model([N("Relu", ["missing"], ["y"])], {"x": (F32, [4])}, {"y": F32}))


def test_data_dependent_shape_is_a_load_error():
    model = _model([N("Reshape", ["x", "s"], ["y"])], {"x": (F32, [2, 3]), "s": (I64, [2])}, {"y": F32})
    with pytest.raises(ModelLoadError, match="known at conversion time"):
        import_onnx(model)


def test_wrong_rank_input_shape():
    with pytest.raises(ShapeError, match="'x'.*rank 3") as info:
        import_onnx(_identity(["b", "s"]), input_shapes={"x": (1, 2, 3)})
    assert "\n" not in str(info.value)


def test_input_shape_conflicting_with_fixed_dim():
    with pytest.raises(ShapeError, match="'x': axis 1 is fixed to 5"):
        import_onnx(_identity(["b", 5]), input_shapes={"x": (2, 4)})


def test_unknown_input_name():
    with pytest.raises(ShapeError, match="nope"):
        import_onnx(_identity([2]), input_shapes={"nope": (2,)})


def test_symbolic_dims_use_batch_seq_unless_given():
    model = _identity(["b", "s", 4])
    assert import_onnx(model, batch=3, seq=7).example_inputs[0].shape == (3, 7, 4)
    assert import_onnx(model, input_shapes={"x": (2, 5, 4)}).example_inputs[0].shape == (2, 5, 4)
    a, b = import_onnx(model, seed=1).example_inputs[0], import_onnx(model, seed=1).example_inputs[0]
    assert torch.equal(a, b)
