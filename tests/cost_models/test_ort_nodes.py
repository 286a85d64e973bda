"""group_kernels for ONNX Runtime counts the nodes ORT runs that torch only views: Reshapes and Transposes."""

import pytest
import torch

from tfcompile.cost_models.calibration import features
from tfcompile.cost_models.fusion import group_kernels
from tfcompile.graph import export_module


class _Heads(torch.nn.Module):
    """A projection split into heads, as attention does: linear on [B, S, D], view, permute(0, 2, 1, 3)."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(32, 32)

    def forward(self, x):
        q = self.q(x).view(1, 8, 4, 8).permute(0, 2, 1, 3)
        scores = torch.matmul(q, q.transpose(-1, -2))
        return scores


def _graph():
    return export_module(_Heads().eval(), (torch.randn(1, 8, 32),), name="heads")


def test_ort_runs_views_and_head_permutes_as_nodes():
    kernels = group_kernels(_graph(), "ort")
    classes = [k.op_class for k in kernels]
    # linear on 3-D input: Reshape, Gemm, Reshape; the head view; the head permute copies; the q·qᵀ swap is
    # read by the matmul, which ORT folds into FusedMatMul.
    assert classes.count("view") == 3
    permutes = [k for k in kernels if any("permute" in n for n in k.nodes)]
    assert len(permutes) == 1 and permutes[0].op_class == "memory"
    assert permutes[0].bytes_read == permutes[0].bytes_written == 8 * 32 * 4
    assert not any("transpose" in n for k in kernels for n in k.nodes)


def test_fusing_compilers_and_the_roofline_keep_views_free():
    for backend in ("tvm", None):
        assert not any(k.op_class == "view" for k in group_kernels(_graph(), backend))


def test_torch_eager_dispatches_every_aten_view_and_permute():
    kernels = group_kernels(_graph(), "torch")
    views = [n for k in kernels if k.op_class == "view" for n in k.nodes]
    # the head view, its permute and the q·qᵀ transpose: each an ATen call eager torch dispatches
    assert len(views) == 3 and any("permute" in n for n in views) and any("transpose" in n for n in views)
    assert all(k.bytes_moved == 0 for k in kernels if k.op_class == "view")


def test_view_nodes_are_their_own_calibration_feature():
    row = features(_graph(), "ort")
    assert row[-3] == 3  # view nodes
    assert row[-2] == len([k for k in group_kernels(_graph(), "ort") if k.op_class != "view"])


@pytest.mark.parametrize("name", ["bert-base", "gpt2-small", "vit-base"])
def test_residual_norms_are_the_skip_layer_norms_ort_runs(name, tmp_path):
    """Post-norm BERT fuses every residual add into its LayerNorm; pre-norm GPT-2 and ViT only the last, whose
    sum nothing else reads. The count of norm_residual kernels is ORT's own count of SkipLayerNormalization."""
    from tests.tiny import load_tiny
    from tfcompile.backends import ort
    from tfcompile.backends.ort_profile import profile_runs

    graph = load_tiny(name, batch=1, seq=16)
    kernels = group_kernels(graph, "ort")
    path = ort.export_onnx(graph, tmp_path / "model.onnx", external_data=True)
    ops = [node.op_type for node in profile_runs(path, graph.example_inputs, runs=1).nodes]
    assert sum(k.op_class == "norm_residual" for k in kernels) == ops.count("SkipLayerNormalization") > 0
    assert sum(k.op_class == "norm" for k in kernels) == ops.count("LayerNormalization")
    assert not any(k.op_class == "norm_residual" for k in group_kernels(graph, "tvm"))


def test_a_profile_from_before_the_residual_norm_class_prices_it_as_a_norm():
    from tests.tiny import load_tiny
    from tfcompile.cost_models.calibration import Profile

    graph = load_tiny("bert-base", batch=1, seq=16)
    old = Profile(target="cpu", backend="ort", s_per_flop={"norm": 1e-9}, s_per_byte={"norm": 1e-10},
                  kernel_overhead_s=0.0, graph_overhead_s=0.0)
    residual = next(k for k in group_kernels(graph, "ort") if k.op_class == "norm_residual")
    assert old.kernel_s(residual) == pytest.approx(1e-9 * residual.flops + 1e-10 * residual.bytes_moved)
