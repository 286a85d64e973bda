import pytest
import torch

from tfcompile.variants import CLEANUP, VariantSpec, build_variant, extend_variant
from tests.tiny import load_tiny


def test_extending_a_variant_equals_building_it_from_the_original():
    graph = load_tiny("gpt2-small")
    parent = build_variant(graph, VariantSpec("cleanup", CLEANUP))
    spec = VariantSpec("cleanup+fold_norm_affine", CLEANUP + ("fold_norm_affine",))
    extended = extend_variant(parent, spec)
    rebuilt = build_variant(graph, spec)
    assert extended.applied_passes == rebuilt.applied_passes
    assert "fold_norm_affine" in extended.applied_passes
    assert extended.graph.name == spec.name and parent.graph.name == "cleanup"
    for a, b in zip(extended.graph.run(), rebuilt.graph.run()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_refused_pass_leaves_the_parent_graph_alone():
    graph = load_tiny("bert-base")  # Post-LN: layernorm_to_rmsnorm refuses
    parent = build_variant(graph, VariantSpec("cleanup", CLEANUP))
    child = extend_variant(parent, VariantSpec("cleanup+layernorm_to_rmsnorm", CLEANUP + ("layernorm_to_rmsnorm",)))
    assert not child.outcomes[-1].applied and "Post-LN" in child.outcomes[-1].reason
    assert parent.graph.name == "cleanup"


def test_extending_by_anything_but_one_pass_is_an_error():
    graph = load_tiny("bert-base")
    parent = build_variant(graph, VariantSpec("baseline", ()))
    with pytest.raises(ValueError):
        extend_variant(parent, VariantSpec("cleanup", CLEANUP))
