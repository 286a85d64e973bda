import pytest
import torch

from tfcompile.passes import apply_pass
from tfcompile.verify import compare_outputs
from tests.passes.helpers import assert_rewrite_preserves, to_float64
from tests.tiny import load_tiny

aten = torch.ops.aten
MERGEABLE = ["bert-base", "vit-base", "llama-tiny", "minilm"]


def _linears(graph):
    return sum(n.target is aten.linear.default for n in graph.call_nodes())


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_is_exact_in_fp32(name):
    graph = load_tiny(name)
    rewritten = assert_rewrite_preserves(graph, "merge_qkv_projections", rel_tol=1e-5)
    assert _linears(rewritten) < _linears(graph)


@pytest.mark.parametrize("name", ["bert-base", "llama-tiny"])
def test_merge_is_exact_in_fp64(name):
    # The traced graph asserts fp32 metadata; drop those asserts before casting.
    graph, _ = apply_pass(load_tiny(name), "remove_identity_ops")
    graph = to_float64(graph)
    assert_rewrite_preserves(graph, "merge_qkv_projections", rel_tol=1e-12)


def test_llama_merges_qkv_and_gate_up():
    graph = load_tiny("llama-tiny")  # 2 layers: q/k/v and gate/up per layer
    rewritten, outcome = apply_pass(graph, "merge_qkv_projections")
    assert outcome.reason == "merged 10 projections into 4 GEMMs"
    assert _linears(graph) - _linears(rewritten) == 6


def test_gpt2_already_fused_is_refused_with_reason():
    graph = load_tiny("gpt2-small")
    same, outcome = apply_pass(graph, "merge_qkv_projections")
    assert not outcome.applied
    assert "already fused" in outcome.reason
    assert same is graph


def test_merge_detects_wrong_split_as_error():
    # Negative control: swapping two merged outputs must be caught by the same comparison.
    graph = load_tiny("bert-base")
    rewritten, _ = apply_pass(graph, "merge_qkv_projections")
    getitems = [n for n in rewritten.call_nodes() if n.target.__name__ == "getitem"
                and n.args[0].target is aten.split_with_sizes.default]
    getitems[0].args = (getitems[0].args[0], 2)  # read v where q was meant
    rewritten.gm.recompile()
    check = compare_outputs(graph.run(), rewritten.run(graph.example_inputs))
    assert check.max_rel_err > 1e-5  # the tolerance the exactness tests use
