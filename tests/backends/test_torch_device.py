"""The torch device backend on cpu: precisions and their tolerances, refusals, compile, timing.

What needs a GPU (CUDA-graph capture, CUDA-event timing, TF32) is run by
benchmarks/gpu_check.py on a GPU machine; here cuda must be refused in one line.
"""

import shutil

import pytest
import torch

from tests.tiny import load_tiny
from tfcompile.backends import torch_device
from tfcompile.backends.runner import Lowered
from tfcompile.backends.torch_device import TOLERANCE, cast_graph, lower_device, measure_device
from tfcompile.cost_models.op_costs import dtype_name
from tfcompile.errors import BackendError
from tfcompile.graph import export_module, fetch_attr


@pytest.fixture(scope="module")
def gpt2():
    return load_tiny("gpt2-small")


@pytest.fixture(scope="module")
def llama():
    return load_tiny("llama-tiny")


def test_eager_fp32_matches_the_reference(gpt2):
    low = lower_device(gpt2, device="cpu", mode="eager", precision="fp32")
    assert isinstance(low, Lowered) and low.label == "torch cpu eager fp32"
    reference = gpt2.run()
    assert [o.shape for o in low.outputs] == [r.shape for r in reference]
    assert low.max_rel_err <= TOLERANCE["fp32"]
    assert any("max relative error" in note for note in low.notes)
    low.run()  # the zero-argument run of runner.Lowered


def test_bf16_passes_its_tolerance_and_fails_fp32s(gpt2):
    low = lower_device(gpt2, precision="bf16")
    assert TOLERANCE["fp32"] < low.max_rel_err <= TOLERANCE["bf16"]
    assert low.outputs[0].dtype == torch.float32  # outputs come back as cpu fp32 for checking
    with pytest.raises(BackendError, match="differs from cpu fp32 by .* relative"):
        lower_device(gpt2, precision="bf16", tolerance=TOLERANCE["fp32"])


def test_fp16_runs_on_cpu(llama):
    low = lower_device(llama, precision="fp16", reference=llama.run())
    assert low.max_rel_err <= TOLERANCE["fp16"]


def test_cast_graph_casts_parameters_in_a_copy_and_refreshes_shapes(llama):
    cast = cast_graph(llama, "bf16")
    assert cast_graph(llama, "fp32") is llama
    weight = next(n.target for n in llama.nodes("get_attr") if n.target.endswith("q_proj.weight"))
    assert fetch_attr(cast.gm, weight).dtype == torch.bfloat16
    assert fetch_attr(llama.gm, weight).dtype == torch.float32  # the original is untouched
    # The RoPE frequencies (a buffer) and the model's explicit fp32 casts stay fp32 ...
    assert fetch_attr(cast.gm, "model.model.rotary_emb.inv_freq").dtype == torch.float32
    kinds = {dtype_name(n) for n in cast.call_nodes()}
    assert {"bf16", "fp32"} <= kinds  # ... and the cost model sees the cast graph's own dtypes
    # where an fp32 island meets a bf16 weight, one cast per tensor was inserted
    casts = [n for n in cast.call_nodes() if n.target == torch.ops.aten._to_copy.default
             and n.kwargs.get("dtype") == torch.bfloat16]
    assert casts and len({n.args[0] for n in casts}) == len(casts)


def test_float_inputs_are_cast_too():
    vit = load_tiny("vit-base")
    low = lower_device(vit, precision="bf16")
    assert cast_graph(vit, "bf16").example_inputs[0].dtype == torch.bfloat16
    assert low.max_rel_err <= TOLERANCE["bf16"]


@pytest.mark.slow  # inductor builds its C++ kernel (about 20 s); the other modes run in the default set
def test_compile_on_cpu_runs_when_a_cpp_compiler_is_here_else_is_refused():
    torch.manual_seed(0)
    graph = export_module(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()), (torch.randn(2, 16),),
                          name="linear-gelu")
    if shutil.which("g++") or shutil.which("c++"):
        low = lower_device(graph, mode="compile")
        assert low.max_rel_err <= TOLERANCE["fp32"]
        assert "Inductor" in " ".join(low.notes)
    else:  # pragma: no cover - the team's machines have g++
        with pytest.raises(BackendError, match="compile on cpu failed"):
            lower_device(graph, mode="compile")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_in_one_line(gpt2):
    with pytest.raises(BackendError, match="no CUDA device here") as info:
        lower_device(gpt2, device="cuda")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(mode="graphs"), "needs --device cuda"),
    (dict(precision="tf32"), "tensor-core format"),
    (dict(mode="jit"), "unknown mode"),
    (dict(precision="int4"), "unknown precision"),
    (dict(device="tpu"), "unknown device"),
])
def test_what_cpu_cannot_run_is_refused_with_a_reason(gpt2, kwargs, reason):
    with pytest.raises(BackendError, match=reason):
        lower_device(gpt2, **kwargs)


def test_device_arguments_are_pointed_at_the_device_without_running(llama):
    from tfcompile.graph import clone

    gm = clone(llama).gm
    assert torch_device.retarget_devices(gm, torch.device("cuda")) > 0  # llama moves its RoPE buffer to cpu
    devices = [a for n in gm.graph.nodes for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.device)]
    assert devices and all(d.type == "cuda" for d in devices)
    assert all(a.type == "cpu" for n in llama.gm.graph.nodes for a in (*n.args, *n.kwargs.values())
               if isinstance(a, torch.device))  # the original graph is untouched


def test_precision_flags_set_tf32_only_for_tf32_and_restore():
    before = torch.backends.cuda.matmul.fp32_precision
    with torch_device.precision_flags("tf32"):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    with torch_device.precision_flags("fp32"):
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == before


def test_interleaved_timing_gives_positive_medians(gpt2):
    runs = {p: lower_device(gpt2, precision=p) for p in ("fp32", "bf16")}
    result = measure_device(runs, warmup=1, repeat=4)
    assert set(result) == {"fp32", "bf16"}
    assert all(m.median_s > 0 and len(m.samples_s) == 4 for m in result.values())
    assert result["bf16"].backend == "torch cpu eager bf16"


def test_one_device_per_timing(gpt2):
    low = lower_device(gpt2)
    other = lower_device(gpt2)
    other.device = "cuda"
    with pytest.raises(BackendError, match="one device at a time"):
        measure_device({"a": low, "b": other}, warmup=0, repeat=1)


def test_device_copy_leaves_nothing_on_cpu(llama):
    """Stands in for cuda: after a copy to the meta device no attribute, input or device argument is on cpu."""
    gm, inputs = torch_device.device_copy(cast_graph(llama, "bf16"), "meta")
    attrs = [fetch_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    devices = [a for n in gm.graph.nodes for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.device)]
    assert {t.device.type for t in (*attrs, *inputs)} == {"meta"} and {d.type for d in devices} == {"meta"}
    with torch.no_grad():
        out = gm(*inputs)
    assert all(o.device.type == "meta" for o in (out if isinstance(out, (tuple, list)) else (out,)))
    assert fetch_attr(llama.gm, "model.model.rotary_emb.inv_freq").device.type == "cpu"
