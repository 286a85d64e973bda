"""Structured FFNs: structure_ffn (truncated SVD), premerge_ffn (push the identity), the dense/structured cost."""

import functools

import pytest
import torch
import torch.nn.functional as F

from tfcompile.cost_models import estimate, load_device
from tfcompile.cost_models.ffn import choose_ffn_form, choose_form
from tfcompile.cost_models.model import cost_model_for
from tfcompile.graph import export_module
from tfcompile.passes import PassContext, apply_pass, get_pass
from tfcompile import structure
from tfcompile.verify import compare_outputs, verify
from tests.passes.helpers import assert_rewrite_preserves, to_float64
from tests.tiny import load_tiny

aten = torch.ops.aten
FP32_TOL, FP64_TOL = 1e-5, 1e-12
GEMMS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default, aten.einsum.default}


# --------------------------------------------------------------------------- a model with structured FFNs

class BlockShuffle(torch.nn.Module):
    """Monarch: blkdiag(W2) · Π · blkdiag(W1) · x + b, written with reshape/transpose and einsum or bmm."""

    def __init__(self, d_in, d_out, k, style):
        super().__init__()
        self.k, self.style = k, style
        p, s = d_in // k, d_out // k
        self.w1 = torch.nn.Parameter(torch.randn(k, p, p) / p ** 0.5)  # k blocks, q×p
        self.w2 = torch.nn.Parameter(torch.randn(k, s, p) / p ** 0.5)  # k blocks, s×r
        self.bias = torch.nn.Parameter(0.1 * torch.randn(d_out))

    def forward(self, x):
        b, t, _ = x.shape
        k = self.k
        if self.style == "einsum":
            y = torch.einsum("kqp,btkp->btkq", self.w1, x.reshape(b, t, k, -1)).reshape(b, t, -1)
            y = y.reshape(b, t, -1, k).transpose(-1, -2)  # the shuffle Π: (k, l) → (l, k)
            y = torch.einsum("lsr,btlr->btls", self.w2, y)
        else:
            xb = x.reshape(b * t, k, -1).transpose(0, 1)  # k, bt, p
            y = torch.bmm(xb, self.w1.transpose(1, 2)).transpose(0, 1).reshape(b * t, -1)
            y = y.reshape(b * t, -1, k).transpose(0, 2).transpose(1, 2)  # Π, then (l, bt, r)
            y = torch.bmm(y, self.w2.transpose(1, 2)).transpose(0, 1)
        return y.reshape(b, t, -1) + self.bias

    def naive_weight(self):
        """blkdiag(W2)·blkdiag(W1) with Π left out: the wrong pre-merge (negative control)."""
        return torch.block_diag(*self.w2) @ torch.block_diag(*self.w1)


class LowRank(torch.nn.Module):
    def __init__(self, d_in, d_out, r):
        super().__init__()
        self.v, self.u = torch.nn.Linear(d_in, r, bias=False), torch.nn.Linear(r, d_out)

    def forward(self, x):
        return self.u(self.v(x))


class StructuredNet(torch.nn.Module):
    """Two pre-LN FFN blocks: one low-rank, one block-shuffle (einsum up, bmm down)."""

    def __init__(self, d=32, hidden=64, r=8, k=4):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.lowrank = torch.nn.ModuleList([LowRank(d, hidden, r), LowRank(hidden, d, r)])
        self.monarch = torch.nn.ModuleList([BlockShuffle(d, hidden, k, "einsum"), BlockShuffle(hidden, d, k, "bmm")])

    def forward(self, x):
        x = x + self.lowrank[1](F.gelu(self.lowrank[0](self.ln(x))))
        return x + self.monarch[1](F.gelu(self.monarch[0](self.ln(x))))


def _structured_graph():
    torch.manual_seed(0)
    module = StructuredNet()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    return module, export_module(module, (x,), name="structured")


def _gemms(graph):
    return [n for n in graph.call_nodes() if n.target in GEMMS]


@functools.cache
def _minilm():
    return load_tiny("minilm")


# --------------------------------------------------------------------------- premerge_ffn

def test_premerge_lowrank_and_block_shuffle_is_exact_in_fp32():
    _, graph = _structured_graph()
    assert len(structure.linear_chains(graph)) == 4
    merged = assert_rewrite_preserves(graph, "premerge_ffn", rel_tol=FP32_TOL)
    # Each structured projection is one dense GEMM now; no bmm/einsum left.
    assert [n.target for n in _gemms(merged)] == [aten.linear.default] * 4
    graph.run()  # the original still runs: its weights were not touched


def test_premerge_is_exact_in_fp64():
    _, graph = _structured_graph()
    graph, _ = apply_pass(graph, "remove_identity_ops")  # drop fp32 metadata asserts before casting
    assert_rewrite_preserves(to_float64(graph), "premerge_ffn", rel_tol=FP64_TOL)


def test_naive_blkdiag_product_without_shuffle_is_detected_as_wrong():
    module, graph = _structured_graph()
    merged, _ = apply_pass(graph, "premerge_ffn")
    reference = graph.run()
    # The merged up-projection of the block-shuffle FFN, the first GEMM after the second norm.
    norm2 = [n for n in merged.call_nodes() if n.target is aten.layer_norm.default][1]
    up = next(u for u in norm2.users if u.target is aten.linear.default)
    # The pass's weight is the block-shuffle op applied to the identity; the naive product is not.
    block = module.monarch[0]
    with torch.no_grad():
        pushed = (block(torch.eye(32).reshape(1, 32, 32)) - block.bias).reshape(32, -1).t()
    good = getattr(merged.gm, up.args[1].target)
    assert torch.allclose(good, pushed, atol=1e-5)
    naive = block.naive_weight().detach()
    assert (naive - pushed).abs().max() > 0.1
    with merged.gm.graph.inserting_before(up):
        naive_node = merged.gm.graph.get_attr(structure.add_constant(merged.gm, "naive_w", naive))
    up.args = (up.args[0], naive_node, *up.args[2:])
    merged.gm.graph.lint()
    merged.gm.recompile()
    check = compare_outputs(reference, merged.run(graph.example_inputs))
    assert check.max_rel_err > 1e-2  # far above the tolerance the exactness tests use


class TokenMixer(torch.nn.Module):
    """Two linears around a constant mixing of the token axis: linear, but not token-wise."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(4, 8)
        self.register_buffer("mix", torch.randn(6, 6))

    def forward(self, x):
        return self.b(torch.einsum("st,btd->bsd", self.mix, self.a(x)))


def test_premerge_refuses_a_chain_that_mixes_tokens():
    torch.manual_seed(0)
    graph = export_module(TokenMixer(), (torch.randn(1, 6, 8),), name="mixer")
    assert get_pass("premerge_ffn").check(graph) is None  # the chain is found...
    same, outcome = apply_pass(graph, "premerge_ffn")
    assert not outcome.applied  # ...but not merged
    assert "not a token-wise affine map" in outcome.reason


def test_premerge_refuses_dense_ffn_with_reason():
    graph = load_tiny("bert-base")
    same, outcome = apply_pass(graph, "premerge_ffn")
    assert not outcome.applied and same is graph
    assert "nothing structured to merge" in outcome.reason


# --------------------------------------------------------------------------- structure_ffn

def test_ffn_blocks_are_found_in_each_architecture():
    gpt2, llama = load_tiny("gpt2-small"), load_tiny("llama-tiny")
    blocks = structure.ffn_blocks(gpt2)
    assert len(blocks) == 2 and all(b.down.kind == "addmm" and len(b.ups) == 1 for b in blocks)
    assert [len(b.ups) for b in structure.ffn_blocks(llama)] == [2, 2]  # gate and up
    merged, _ = apply_pass(llama, "merge_qkv_projections")  # gate/up become one GEMM and a split
    assert [len(b.ups) for b in structure.ffn_blocks(merged)] == [1, 1]


def test_structure_refuses_a_model_without_ffn():
    graph = export_module(LowRank(8, 8, 2), (torch.randn(1, 3, 8),), name="lowrank")
    reason = get_pass("structure_ffn").check(graph)
    assert reason is not None and "no FFN block" in reason


@pytest.mark.parametrize("name", ["gpt2-small", "bert-base"])
def test_structure_reports_per_layer_error_and_premerge_reproduces_it(name):
    graph = load_tiny(name)
    structured, outcome = apply_pass(graph, "structure_ffn", every_projection=True, rank_ratio=0.5)
    assert outcome.applied and not get_pass("structure_ffn").exact
    records = outcome.record.projections
    assert len(records) == 4  # 2 layers × (up, down)
    for r in records:
        assert r.rank == min(r.in_features, r.out_features) // 2
        assert 0.05 < r.rel_error < 1  # random weights have a flat spectrum: half the rank loses a lot
        assert f"{r.layer} {r.rel_error:.3f}" in outcome.reason
    assert len(_gemms(structured)) == len(_gemms(graph)) + 4  # each FFN projection is two GEMMs
    check = verify(graph, structured)
    assert check.max_rel_err > 1e-3  # the function changed...
    assert check.quality > 0.5  # ...but not beyond recognition
    # premerge after structure: the same (approximated) function, one dense GEMM per projection again.
    merged = assert_rewrite_preserves(structured, "premerge_ffn", rel_tol=FP32_TOL)
    assert len(_gemms(merged)) == len(_gemms(graph))


def test_full_rank_is_near_exact_on_gpt2():
    graph = load_tiny("gpt2-small")
    structured, outcome = apply_pass(graph, "structure_ffn", every_projection=True, rank_ratio=1.0)
    assert max(r.rel_error for r in outcome.record.projections) < 1e-12
    check = verify(graph, structured)
    assert check.quality == 1.0 and check.max_rel_err < 1e-4


def test_error_budget_picks_the_rank():
    graph = load_tiny("bert-base")
    structured, outcome = apply_pass(graph, "structure_ffn", every_projection=True, max_weight_error=0.3)
    records = outcome.record.projections
    assert all(r.rel_error <= 0.3 for r in records)
    assert all(r.rank % 8 == 0 and r.rank <= min(r.in_features, r.out_features) for r in records)
    assert any(r.rank < min(r.in_features, r.out_features) for r in records)  # the budget did cut something


def test_block_dense_form_and_its_premerge():
    graph = load_tiny("bert-base")
    structured, outcome = apply_pass(graph, "structure_ffn", every_projection=True, form="blockdense", blocks=4,
                                     rank_ratio=0.5)
    assert outcome.applied
    assert sum(n.target is aten.bmm.default for n in structured.call_nodes()) == 4
    assert all(r.blocks == 4 and r.rank == 32 for r in outcome.record.projections)
    assert_rewrite_preserves(structured, "premerge_ffn", rel_tol=FP32_TOL)


@pytest.mark.slow  # SVDs of full-size minilm at three ranks; the tiny-model tests above cover structure_ffn
def test_minilm_quality_with_real_weights():
    graph = _minilm()
    reference = graph.run()
    quality = {}
    for ratio in (1.0, 0.75, 0.25):
        structured, outcome = apply_pass(graph, "structure_ffn", every_projection=True, rank_ratio=ratio)
        errors = [r.rel_error for r in outcome.record.projections]
        assert len(errors) == 12  # 6 layers × (up, down)
        check = verify(graph, structured, reference)
        assert check.quality_metric == "mean_cosine"
        quality[ratio] = check.quality
        if ratio == 1.0:
            assert max(errors) < 1e-12 and check.max_rel_err < 1e-4
    # Trained FFN weights are far from low rank: truncation costs real quality (measured 0.79 and 0.40).
    assert 0.6 < quality[0.75] < 0.99
    assert 0.2 < quality[0.25] < quality[0.75]
    assert quality[1.0] > 0.99999


# --------------------------------------------------------------------------- cost

class DenseFFN(torch.nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _gemm_flops(graph):
    return sum(k.flops for k in estimate(graph, load_device("cpu")).kernels if k.op_class == "gemm")


def test_structured_flops_are_rank_times_in_plus_out():
    d, hidden = 64, 256
    graph = export_module(DenseFFN(d, hidden), (torch.randn(1, 16, d),), name="ffn")
    for form in ("lowrank", "blockdense"):
        structured, _ = apply_pass(graph, "structure_ffn", every_projection=True, rank_ratio=0.25, form=form)
        r = d // 4
        if form == "lowrank":
            expected = r * (d + hidden) / (d * hidden)
        else:  # in·r/k + r·out per projection
            expected = (d * r / 4 + r * hidden + hidden * r / 4 + r * d) / (2 * d * hidden)
        ratio = _gemm_flops(structured) / _gemm_flops(graph)
        assert ratio == pytest.approx(expected, rel=1e-6), form


def test_cost_model_picks_dense_on_h100_at_one_token_and_lowrank_on_cpu_at_many():
    h100, cpu = cost_model_for("h100", calibrated=False), cost_model_for("cpu", calibrated=False)
    one = choose_form(768, 3072, 192, 1, h100)
    assert one.best == "dense"  # one launch beats two tiny GEMMs
    assert choose_form(768, 3072, 192, 4096, cpu).best == "structured"
    cross = one.crossover_tokens
    assert cross is not None and 1 < cross < 4096
    assert choose_form(768, 3072, 192, cross - 1, h100).best == "dense"
    assert choose_form(768, 3072, 192, cross, h100).best == "structured"
    ffn = choose_ffn_form(768, 3072, 192, 4096, cpu)
    assert ffn.speedup > 2  # 0.3125 of the FLOPs


def test_choice_is_per_token_count_in_the_passes():
    d, hidden = 256, 1024  # predicted crossover on h100 at rank 64: 1231 tokens for each projection
    module = DenseFFN(d, hidden)
    h100 = PassContext.build("h100", calibrated=False)
    for tokens, factorised in ((1, False), (4096, True)):
        graph = export_module(module, (torch.randn(1, tokens, d),), name=f"ffn{tokens}")
        structured, outcome = apply_pass(graph, "structure_ffn", h100, rank_ratio=0.25)
        assert outcome.applied is factorised, outcome.reason
        if not factorised:
            assert "dense predicted faster at 1 tokens" in outcome.reason
            structured, _ = apply_pass(graph, "structure_ffn", every_projection=True, rank_ratio=0.25)
        # premerge with a target merges back only where the dense GEMM is predicted faster.
        merged, outcome = apply_pass(structured, "premerge_ffn", h100)
        assert outcome.applied is not factorised, outcome.reason
