"""TVM lowering rewrites: vectorisable math, patch convolutions as matmuls, padded computed operands."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from tfcompile.backends.tvm import compile_graph, host_target  # noqa: E402
from tfcompile.backends.tvm.tuning import kernels_of  # noqa: E402
from tfcompile.graph import export_module  # noqa: E402


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _max_rel_error(outputs, reference) -> float:
    return max(((o - r).abs().max() / r.abs().max()).item() for o, r in zip(outputs, reference))


def _kernel_text(graph) -> str:
    return "\n".join(f.script() for f in kernels_of(graph, host_target()).values())


class _Activations(torch.nn.Module):
    def forward(self, x):
        erf_gelu = torch.nn.functional.gelu(x)
        tanh_gelu = 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3.0))))
        return erf_gelu + tanh_gelu + torch.softmax(x, dim=-1) + torch.exp(-x * x)


def test_transcendentals_lower_to_vectorisable_arithmetic_and_match_torch():
    graph = export_module(_Activations(), (_randn(8, 96) * 3,), name="activations")
    text = _kernel_text(graph)
    # libm calls (erff, tanhf, expf, powf) are what kept these kernels scalar.
    for call in ("T.erf(", "T.tanh(", "T.exp(", "T.pow("):
        assert call not in text, call
    module = compile_graph(graph, schedule="rules")
    assert _max_rel_error(module.run(graph.example_inputs), graph.run()) < 1e-5


class _PatchEmbed(torch.nn.Module):
    def __init__(self, stride):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 32, kernel_size=8, stride=stride)

    def forward(self, x):
        return self.conv(x)


def test_patch_convolution_becomes_a_matmul_and_matches_torch():
    graph = export_module(_PatchEmbed(stride=8), (_randn(2, 3, 32, 32),), name="patch-embed")
    names = kernels_of(graph, host_target())
    assert not any("conv2d" in name for name in names), sorted(names)
    assert any("matmul" in name for name in names), sorted(names)
    module = compile_graph(graph, schedule="rules")
    assert _max_rel_error(module.run(graph.example_inputs), graph.run()) < 1e-5


def test_overlapping_convolution_is_left_a_convolution():
    graph = export_module(_PatchEmbed(stride=4), (_randn(1, 3, 32, 32),), name="overlapping-conv")
    assert any("conv2d" in name for name in kernels_of(graph, host_target()))
    module = compile_graph(graph, schedule="rules")
    assert _max_rel_error(module.run(graph.example_inputs), graph.run()) < 1e-5


class _Scores(torch.nn.Module):
    def forward(self, q, k):
        return q @ k.transpose(-1, -2)


def test_computed_operand_with_unaligned_n_is_padded_and_takes_the_matmul_rule():
    # 197 keys, as in ViT-base: no SIMD width divides N.
    graph = export_module(_Scores(), (_randn(4, 197, 64), _randn(4, 197, 64, seed=1)), name="scores")
    module = compile_graph(graph, schedule="rules")
    matmuls = {name: rule for name, rule in module.kernel_rules.items() if "matmul" in name}
    assert matmuls and set(matmuls.values()) == {"matmul"}, module.kernel_rules
    assert _max_rel_error(module.run(graph.example_inputs), graph.run()) < 1e-5
