import pytest
import torch

from tfcompile.passes import apply_pass
from tests.passes.helpers import assert_rewrite_preserves
from tests.tiny import ARCHITECTURES, load_tiny

aten = torch.ops.aten


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_identity_removal_is_exact(name):
    rewritten = assert_rewrite_preserves(load_tiny(name), "remove_identity_ops", rel_tol=0.0)
    assert not any(n.target is aten.dropout.default for n in rewritten.call_nodes())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_fold_constants_is_exact(name):
    graph = load_tiny(name)
    rewritten = assert_rewrite_preserves(graph, "fold_constants", rel_tol=0.0)
    assert len(rewritten.call_nodes()) < len(graph.call_nodes())


def test_fold_constants_removes_gpt2_bool_mask_construction():
    # The causal mask is built from arange/eq/le on bools: TVM's LLVM codegen
    # cannot lower `equal` on i1, and the mask never depends on token values.
    graph = load_tiny("gpt2-small")
    bool_ops = {aten.eq.Tensor, aten.le.Tensor, aten.__and__.Tensor}
    assert any(n.target in bool_ops for n in graph.call_nodes())
    folded, _ = apply_pass(graph, "fold_constants")
    assert not any(n.target in bool_ops for n in folded.call_nodes())


def test_fold_constants_keeps_input_dependent_nodes():
    graph = load_tiny("bert-base")
    folded, _ = apply_pass(graph, "fold_constants")
    assert any(n.target is aten.embedding.default for n in folded.call_nodes())
    # Different token ids must still give different outputs.
    ids, mask = folded.example_inputs
    other = ((ids + 1) % 512, mask)
    assert not torch.equal(folded.run(other)[0], folded.run()[0])


def test_dead_code_elimination():
    graph = load_tiny("bert-base")
    with graph.gm.graph.inserting_after(next(iter(graph.gm.graph.nodes))):
        first = next(iter(graph.gm.graph.nodes))
        graph.gm.graph.call_function(aten.neg.default, (first,))
    graph.gm.recompile()
    rewritten = assert_rewrite_preserves(graph, "eliminate_dead_code", rel_tol=0.0)
    assert not any(n.target is aten.neg.default for n in rewritten.call_nodes())


def test_dead_code_refuses_when_nothing_is_dead():
    graph, first = apply_pass(load_tiny("bert-base"), "eliminate_dead_code")
    assert first.applied
    _, again = apply_pass(graph, "eliminate_dead_code")
    assert not again.applied and again.reason == "no dead nodes"
