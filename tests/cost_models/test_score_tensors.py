import math

import pytest
import torch
import torch.nn.functional as F

from tfcompile.cost_models.calibration import Profile, score_pass_bytes
from tfcompile.cost_models.fusion import group_kernels
from tfcompile.cost_models.op_costs import unfused_score_bytes
from tfcompile.cost_models.score_tensors import explicit_score_bytes, explicit_score_passes
from tfcompile.graph import export_module

BATCH, HEADS, TOKENS, HEAD = 1, 4, 64, 16
SCORE_BYTES = BATCH * HEADS * TOKENS * TOKENS * 4


class WrittenOut(torch.nn.Module):
    """Attention op by op, as token merging writes it: scale, additive bias, softmax, and a sum over the
    probabilities (the attention each token receives)."""

    def forward(self, q, k, v, bias):
        scores = torch.matmul(q, k.transpose(-1, -2)) * (HEAD ** -0.5)
        probs = torch.softmax(scores + bias, dim=-1)
        return torch.matmul(probs, v), probs.sum(dim=(1, 2))


class Fused(torch.nn.Module):
    def forward(self, q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class Projection(torch.nn.Module):
    """Matmuls against a weight, and one of two activations that shrinks: no score tensor."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(HEAD, 4 * TOKENS))

    def forward(self, q, k, v, bias):
        return torch.matmul(q, self.weight), torch.matmul(q.transpose(-1, -2), v)


def _inputs():
    torch.manual_seed(0)
    shape = (BATCH, HEADS, TOKENS, HEAD)
    return torch.randn(shape), torch.randn(shape), torch.randn(shape), torch.randn(BATCH, 1, TOKENS, TOKENS)


def _graph(module):
    return export_module(module, _inputs(), name=type(module).__name__)


def test_a_written_out_attention_makes_an_sdpas_passes_over_its_scores():
    written = explicit_score_bytes(_graph(WrittenOut()))
    sdpa_node = next(n for n in _graph(Fused()).call_nodes() if "scaled_dot_product" in str(n.target))
    fused = unfused_score_bytes(sdpa_node)
    # QK^T writes, softmax reads and writes, PV reads: the four passes of an SDPA.
    assert written["scores"] == fused["scores"] == 4 * SCORE_BYTES
    # The bias's Add as the SDPA's mask Add; the sum over heads and queries reads the probabilities once, a
    # reduction (ORT's ReduceSum over non-contiguous axes), not a mask's pass.
    assert fused["score_mask"] == written["score_mask"] == SCORE_BYTES
    assert written["score_reduce"] == SCORE_BYTES and "score_reduce" not in fused


def test_the_scale_after_the_score_matmul_is_folded_into_it():
    passes = explicit_score_passes(_graph(WrittenOut()))
    folded = [name for name, p in passes.items() if not p.kernel]
    assert len(folded) == 1 and folded[0].startswith("mul")
    assert passes[folded[0]].bytes_by_kind == {}


def test_matmuls_against_weights_or_that_shrink_make_no_score_tensor():
    assert explicit_score_passes(_graph(Projection())) == {}


@pytest.mark.parametrize("backend", ["ort", "tvm"])
def test_on_backends_with_unfused_attention_the_score_ops_are_attention_kernels_without_bytes(backend):
    graph = _graph(WrittenOut())
    kernels = group_kernels(graph, backend)
    attention = [k for k in kernels if k.op_class == "attention"]
    # two matmuls with their FLOPs; the bias Add, the softmax and the sum as launches of no bytes
    assert len(attention) == 5
    assert sum(k.flops for k in attention) == 2 * 2 * BATCH * HEADS * TOKENS * TOKENS * HEAD
    assert all(k.bytes_moved == 0 for k in attention)
    assert not [k for k in kernels if k.op_class in ("gemm", "softmax")]
    assert score_pass_bytes(graph, backend)["scores"] == 4 * SCORE_BYTES


def test_torch_eager_and_the_roofline_still_see_the_ops_themselves():
    graph = _graph(WrittenOut())
    for backend in ("torch", None):
        classes = {k.op_class for k in group_kernels(graph, backend)}
        assert {"gemm", "softmax"} <= classes
    assert score_pass_bytes(graph, "torch") == {}


def test_a_written_out_attention_is_predicted_as_its_sdpa_plus_its_extra_pass():
    rates = {"scores": 1e-10, "score_mask": 3e-10, "attention": 0.0}
    profile = Profile("cpu", "ort", s_per_flop={"attention": 1e-12}, s_per_byte=rates, kernel_overhead_s=0.0,
                      graph_overhead_s=0.0)
    written, fused = profile.predict_s(_graph(WrittenOut())), profile.predict_s(_graph(Fused()))
    extra_s = 3e-10 * SCORE_BYTES  # the sum over the probabilities; the SDPA's softmax FLOPs are its own
    softmax_flops_s = 1e-12 * 5 * BATCH * HEADS * TOKENS * TOKENS
    assert written == pytest.approx(fused + extra_s - softmax_flops_s, rel=1e-6)
    assert math.isfinite(written)
