"""hard_attention_topk and local_attention (approximate attention sparsification)."""

from __future__ import annotations


import pytest
import torch

from tests.tiny import load_tiny
from tfcompile.cost_models import estimate, load_device
from tfcompile.graph import clone
from tfcompile.passes import apply_pass, get_pass
from tfcompile import structure
from tfcompile.knob_search.attention_layers import choose_layers
from tfcompile.passes.attention_sparsity import band_mask
from tfcompile.verify import compare_outputs

aten = torch.ops.aten


@pytest.fixture(scope="module")
def gpt2():
    return load_tiny("gpt2-small", batch=2, seq=32)


@pytest.fixture(scope="module")
def bert():
    return load_tiny("bert-base", batch=2, seq=32)


def _banded_reference(graph, window: int, sinks: int = 0):
    """The dense model with every SDPA's mask replaced by the [S, S] band: a masked dense product."""
    ref = clone(graph)
    for site in structure.attention_sites(ref):
        seq = structure.tensor_meta(site.node.args[0]).shape[2]
        causal = site.is_causal
        if site.mask is not None:
            mask = structure.evaluate_nodes(ref, [site.mask])[site.mask]
            causal = causal or not bool(mask.all())  # the tiny models' masks are full or causal
        name = structure.add_constant(ref.gm, "band", band_mask(seq, window, causal, sinks))
        with ref.gm.graph.inserting_before(site.node):
            attr = ref.gm.graph.get_attr(name)
        args = list(site.node.args) + [None] * (4 - len(site.node.args))
        args[3] = attr
        site.node.args = tuple(args)
        site.node.kwargs = {k: v for k, v in site.node.kwargs.items() if k != "is_causal"}
    ref.gm.graph.eliminate_dead_code()
    ref.gm.recompile()
    return ref


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_window_covering_the_sequence_is_refused_and_leaves_the_graph_alone(name, request):
    """A band as wide as the sequence drops nothing: the plan refuses (graph untouched), so the search has no row."""
    graph = request.getfixturevalue(name)  # 32 tokens
    before = graph.gm.code
    for knobs in ({"window": 31}, {"window": 32}, {"window": 1000}, {"window": 128, "full_layers": [0]},
                  {"window": 512, "block": 128, "full_layers": [0]}):
        variant, outcome = apply_pass(graph, "local_attention", **knobs)
        assert not outcome.applied and variant is graph, (knobs, outcome.reason)
        assert "covers all 32 tokens" in outcome.reason and "change nothing" in outcome.reason
        assert "covers all 32 tokens" in get_pass("local_attention").check(graph)
    assert graph.gm.code == before
    # One token short of covering: applies (query 0 no longer sees key 31 in a bidirectional layer; a causal
    # layer's sink keeps key 0 in view, so it needs one more).
    variant, outcome = apply_pass(graph, "local_attention", window=29)
    assert outcome.applied, outcome.reason


def test_search_does_not_propose_a_window_covering_the_sequence():
    from tfcompile.optimize import OptimizeSettings, optimize

    graph = load_tiny("bert-base", batch=1, seq=32)
    result = optimize(graph, OptimizeSettings(target="cpu", allow_approx=True, budget=0.0))
    result.cleanup()
    assert all("local_attention" not in r.passes for r in result.reports)
    assert "covers all 32 tokens" in result.refusals["local_attention"]


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_top_k_covering_the_sequence_is_dense(name, request):
    graph = request.getfixturevalue(name)
    reference = graph.run()
    for pass_name, knobs in (("hard_attention_topk", {"k": 32}), ("hard_attention_topk", {"k": 4096})):
        variant, outcome = apply_pass(graph, pass_name, **knobs)
        assert outcome.applied, outcome.reason
        check = compare_outputs(reference, variant.run(graph.example_inputs), graph.output_names)
        assert check.max_rel_err <= 1e-5, (pass_name, knobs, check)
        assert not get_pass(pass_name).exact


@pytest.mark.parametrize("name", ["gpt2", "bert"])
@pytest.mark.parametrize("window,sinks,block", [(8, 0, None), (5, 0, None), (1, 0, None), (5, 1, None),
                                                (4, 6, None), (8, 1, 2), (5, 0, 3), (7, 2, 4), (12, 0, 5)])
def test_local_attention_is_exactly_banded_attention(name, window, sinks, block, request):
    # 5 does not divide 32; blocks of 2-5 queries reach 2-4 blocks to each side.
    graph = request.getfixturevalue(name)
    variant, outcome = apply_pass(graph, "local_attention", window=window, sinks=sinks, block=block)
    assert outcome.applied, outcome.reason
    expected = _banded_reference(graph, window, sinks).run(graph.example_inputs)
    got = variant.run(graph.example_inputs)
    check = compare_outputs(expected, got, graph.output_names)
    assert check.max_rel_err <= 1e-5, check
    # ...and it is a real approximation of the dense model.
    assert compare_outputs(graph.run(), got, graph.output_names).max_rel_err > 1e-4


def test_no_sequence_by_sequence_tensor_remains(gpt2):
    seq = 32
    variant, outcome = apply_pass(gpt2, "local_attention", window=8, sinks=0)
    assert outcome.applied
    squares = [n.name for n in variant.gm.graph.nodes
               if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() >= 2
               and tuple(n.meta["val"].shape[-2:]) == (seq, seq)]
    assert squares == []  # not even the causal-mask construction, which no attention reads any more
    shapes = [tuple(structure.tensor_meta(n.args[1]).shape) for n in variant.call_nodes()
              if n.target is aten.scaled_dot_product_attention.default]
    assert shapes == [(2 * 4, 4, 16, 16)] * 2  # [B·H, S/w, 2w, d]
    # The dense original has them.
    assert any(tuple(n.meta["val"].shape[-2:]) == (seq, seq) for n in gpt2.nodes()
               if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() >= 2)


def test_full_layers_stay_dense_and_layers_knob(gpt2):
    variant, outcome = apply_pass(gpt2, "local_attention", window=8, full_layers=[0], sinks=0)
    assert outcome.applied and "1 of 2 layers [1]" in outcome.reason
    sdpa = [n for n in variant.call_nodes() if n.target is aten.scaled_dot_product_attention.default]
    # Layer 0 dense [B, H, S, d]; layer 1 in tiles [B·H, S/w, w, d].
    assert sorted(tuple(structure.tensor_meta(n.args[0]).shape) for n in sdpa) == [(2, 4, 32, 16), (8, 4, 8, 16)]
    variant, outcome = apply_pass(gpt2, "hard_attention_topk", k=4, layers=[-1])
    assert outcome.applied and "1 of 2 layers [1]" in outcome.reason
    _, outcome = apply_pass(gpt2, "local_attention", window=8, full_layers=[0, 1])
    assert not outcome.applied and "no layer selected" in outcome.reason


def test_records_say_what_was_rewritten(gpt2):
    from tfcompile.passes.attention_sparsity import LocalAttentionRecord, TopKAttentionRecord

    _, outcome = apply_pass(gpt2, "local_attention", window=8, full_layers=[0], sinks=0)
    assert outcome.record == LocalAttentionRecord(window=8, sinks=0, block=8, layers=(1,), of=2)
    _, outcome = apply_pass(gpt2, "hard_attention_topk", k=4)
    assert outcome.record == TopKAttentionRecord(k=4, layers=(0, 1), of=2)


def _attention_flops(graph) -> float:
    from tfcompile.cost_models.op_costs import cost_of
    return sum(cost_of(n).flops for n in graph.call_nodes() if n.target is aten.scaled_dot_product_attention.default)


def test_cost_model_attention_flops_scale_with_window():
    graph = load_tiny("gpt2-small", batch=1, seq=128)
    dense = _attention_flops(graph)
    for window in (8, 16, 32):
        variant, _ = apply_pass(graph, "local_attention", window=window, sinks=0)
        # Tiles of w queries × 2w keys: 2w/S of the dense S×S work; g sink keys add g/S.
        assert _attention_flops(variant) == pytest.approx(dense * 2 * window / 128)
        variant, _ = apply_pass(graph, "local_attention", window=window, sinks=2)
        assert _attention_flops(variant) == pytest.approx(dense * (2 * window + 2) / 128)
        # Blocks of w/4 queries: (m + 1)·b = 5w/4 causal keys per query instead of 2w.
        variant, _ = apply_pass(graph, "local_attention", window=window, sinks=0, block=window // 4)
        assert _attention_flops(variant) == pytest.approx(dense * 5 * window / 4 / 128)
    device = load_device("cpu")
    base = estimate(graph, device)
    local = estimate(apply_pass(graph, "local_attention", window=8)[0], device)
    topk = estimate(apply_pass(graph, "hard_attention_topk", k=8)[0], device)
    assert local.flops < base.flops < topk.flops  # top-k still computes every score, plus a TopK


@pytest.mark.parametrize("pass_name", ["local_attention", "hard_attention_topk"])
def test_refusals_name_the_reason(pass_name):
    check = get_pass(pass_name).check

    class NoAttention(torch.nn.Module):
        def forward(self, x):
            return (torch.nn.functional.gelu(x @ x.transpose(-1, -2)),)

    class Cross(torch.nn.Module):
        def forward(self, q, kv):
            return (torch.nn.functional.scaled_dot_product_attention(q, kv, kv),)

    class Alibi(torch.nn.Module):
        def forward(self, q):
            bias = -torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8).contiguous()
            return (torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=bias),)

    from tfcompile.graph import export_module
    x = torch.randn(1, 2, 8, 4)
    assert "no scaled_dot_product_attention" in check(export_module(NoAttention(), (x,), name="n"))
    assert "cross-attention" in check(export_module(Cross(), (x, torch.randn(1, 2, 6, 4)), name="c"))
    assert "bias" in check(export_module(Alibi(), (x,), name="a"))
    # A padded batch: the mask is neither full nor causal on the example inputs.
    from tfcompile.passes.padding import with_lengths
    padded = with_lengths(load_tiny("bert-base", batch=2, seq=16), [16, 9])
    assert "neither full nor causal" in check(padded)
    # Once every layer is sparsified, a second local_attention has nothing left to do.
    graph = load_tiny("gpt2-small", batch=1, seq=16)
    local, _ = apply_pass(graph, "local_attention", window=4)
    assert "already sparsified" in get_pass("local_attention").check(local)


def test_topk_keeps_k_per_query_without_renormalising():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return (torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),)

    from tfcompile.graph import export_module
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 12, 4, generator=gen), torch.randn(1, 2, 12, 4, generator=gen)
    v = torch.eye(12).expand(1, 2, 12, 12).contiguous()  # output row = the kept attention weights
    graph = export_module(Attn(), (q, k, v), name="attn")
    variant, outcome = apply_pass(graph, "hard_attention_topk", k=3)
    assert outcome.applied
    weights = variant.run()[0]
    assert ((weights > 0).sum(-1) == torch.arange(1, 13).clamp(max=3)).all()  # min(k, visible keys)
    dense = torch.softmax((q @ k.transpose(-1, -2)) / 2 + torch.full((12, 12), float("-inf")).triu(1), -1)
    top = dense.topk(3, -1)
    expected = torch.zeros_like(dense).scatter(-1, top.indices, top.values)  # not renormalised
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pass_name,knobs,backend", [
    ("local_attention", {"window": 5}, "ort"),
    pytest.param("local_attention", {"window": 5}, "tvm", marks=pytest.mark.slow),
    # Mixed dense and local layers at batch 2: the case the TVM import used to fail on.
    ("local_attention", {"window": 6, "block": 2, "full_layers": [0]}, "ort"),
    ("local_attention", {"window": 6, "block": 2, "full_layers": [0]}, "tvm"),
    ("hard_attention_topk", {"k": 4}, "ort"),
    pytest.param("hard_attention_topk", {"k": 4}, "tvm", marks=pytest.mark.slow)])
def test_lowered_variant_matches_torch(tmp_path, gpt2, pass_name, knobs, backend):
    from tfcompile.backends.runner import lower

    if backend == "tvm":
        pytest.importorskip("tvm")
    variant, outcome = apply_pass(gpt2, pass_name, **knobs)
    assert outcome.applied
    lowered = lower(variant, backend, tmp_path)
    check = compare_outputs(variant.run(), lowered.outputs, variant.output_names)
    assert check.max_rel_err <= 1e-4, check
    # Quality against the dense model is a figure, reported not asserted tight.
    quality = compare_outputs(gpt2.run(), lowered.outputs, gpt2.output_names)
    assert quality.quality_metric == "top1_agreement" and 0.5 < quality.quality <= 1.0


def test_greedy_layer_choice_meets_budget(gpt2):
    gen = torch.Generator().manual_seed(1)
    heldout = [(torch.randint(0, 512, (2, 32), generator=gen),) for _ in range(2)]
    choice = choose_layers(gpt2, "local_attention", heldout, budget=0.9, window=4)
    assert choice.quality >= 0.9
    assert set(choice.layers) <= {0, 1}
    strict = choose_layers(gpt2, "local_attention", heldout, budget=1.01, window=4)
    assert strict.layers == [] and len(strict.trace) == 2  # every layer tried, none accepted
