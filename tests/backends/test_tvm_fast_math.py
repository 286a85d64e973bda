"""TVM fast-math legalisations: sigmoid, SiLU (built on fast_exp) and log stay within float32 rounding of torch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from tfcompile.backends.tvm import compile_graph  # noqa: E402
from tfcompile.graph import export_module  # noqa: E402


class Sigmoid(torch.nn.Module):
    def forward(self, x):
        return torch.sigmoid(x)


class Silu(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.silu(x)


class Gate(torch.nn.Module):
    """Llama's MLP gate as transformers exports it: silu(a) * b."""

    def forward(self, a, b):
        return torch.nn.functional.silu(a) * b


def _run(module, *inputs):
    compiled = compile_graph(export_module(module, inputs, name=type(module).__name__.lower()))
    return compiled.run(inputs)[0]


@pytest.mark.parametrize("module", [Sigmoid(), Silu()], ids=["sigmoid", "silu"])
def test_fast_sigmoid_and_silu_match_torch_over_the_whole_float_range(module):
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([-1e30, -88.5, 0.0, 88.5, 1e30])]).reshape(1, -1)
    out, ref = _run(module, x), module(x.double()).float()
    assert torch.isfinite(out).all()
    exact_range = x >= -87.0  # fast_exp clamps its input at -88.4; the sigmoid there is a subnormal float
    assert ((out - ref).abs() / ref.abs().clamp_min(torch.finfo(torch.float32).tiny))[exact_range].max().item() < 1e-5
    # Below it the fast sigmoid comes out 0 instead of ~1e-38: absolute errors of that size, no more.
    assert (out - ref).abs()[~exact_range].max().item() < 1e-36


def test_fused_silu_gate_kernel_matches_torch():
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 688, generator=generator) * 4 for _ in range(2))
    out = _run(Gate(), a, b)
    assert torch.allclose(out, Gate()(a, b), rtol=1e-5, atol=1e-6)


class Log(torch.nn.Module):
    def forward(self, x):
        return torch.log(x)


def test_fast_log_matches_float64_from_subnormals_to_the_largest_float_and_keeps_ieee_specials():
    positive = torch.logspace(-45, 38, 100001)  # 1e-45 is the smallest subnormal float
    near_one = torch.tensor([1.0, 1.0000001, 0.99999994, 1.4142135, 1.4142137, 0.70710677, 2.0, 0.5])
    specials = torch.tensor([0.0, -0.0, -1.0, -1e-30, float("inf"), float("-inf"), float("nan")])
    x = torch.cat([positive, near_one, specials]).reshape(1, -1)
    out, ref = _run(Log(), x), torch.log(x.double())
    finite = torch.isfinite(ref)
    relative = (out.double() - ref).abs() / ref.abs().clamp_min(1e-30)
    assert relative[finite].max().item() < 3e-7
    assert (out[x == 1.0] == 0).all()  # log 1 is exactly 0
    assert torch.equal(out[~finite].isnan(), ref[~finite].isnan())
    assert torch.equal(out[~finite & ~ref.isnan()], ref[~finite & ~ref.isnan()].float())  # +-inf


def test_fast_log_kernel_calls_no_libm_log():
    from tfcompile.backends.tvm import host_target
    from tfcompile.backends.tvm.tuning import kernels_of

    graph = export_module(Log(), (torch.rand(4, 64) + 0.5,), name="log")
    text = "\n".join(f.script() for f in kernels_of(graph, host_target()).values())
    assert "T.log(" not in text and "T.reinterpret(" in text
