import pathlib

import pytest

from tfcompile.errors import TfcompileError, UnknownPassError
from tfcompile.passes import Exactness, Stage, all_passes, check_pipeline, get_pass, pass_order, register_pass

TESTS = pathlib.Path(__file__).parent


def test_every_pass_declares_exactness_and_is_tested():
    sources = "".join(p.read_text() for p in TESTS.glob("test_*.py"))
    for p in all_passes():
        assert isinstance(p.exactness, Exactness)
        assert p.description
        assert f'"{p.name}"' in sources, f"pass {p.name} has no test"


def test_duplicate_registration_is_rejected():
    with pytest.raises(ValueError, match="registered twice"):
        register_pass("fold_constants", Exactness.EXACT, "dup", plan=lambda g, c: None,
                      stage=Stage.CLEANUP)(lambda g, plan: None)


def test_unknown_pass_names_the_known_ones():
    with pytest.raises(UnknownPassError, match="fold_constants"):
        get_pass("no_such_pass")


def test_pass_order_follows_stages_and_declared_constraints():
    order = pass_order()
    for name in order:
        p = get_pass(name)
        assert all(order.index(before) < order.index(name) for before in p.runs_after)
    stages = [get_pass(n).stage for n in order]
    assert stages == sorted(stages)
    assert pass_order(["rmsnorm_to_crmsnorm", "fold_norm_affine", "layernorm_to_rmsnorm"]) == [
        "fold_norm_affine", "layernorm_to_rmsnorm", "rmsnorm_to_crmsnorm"]


def test_a_pipeline_against_a_declared_constraint_is_refused():
    check_pipeline(["fold_norm_affine", "rmsnorm_to_crmsnorm"])
    with pytest.raises(TfcompileError, match="names fold_constants twice"):
        check_pipeline(["fold_constants", "cleanup", "fold_constants"])
    with pytest.raises(TfcompileError, match="layernorm_to_rmsnorm must run after fold_norm_affine"):
        check_pipeline(["layernorm_to_rmsnorm", "fold_norm_affine"])


def _documented_example_source() -> str:
    doc = (TESTS.parent.parent / "docs" / "architecture.md").read_text()
    start = doc.index("`tfcompile/passes/mul_by_one.py`:")
    block = doc[doc.index("```python", start) + len("```python"): doc.index("```", doc.index("```python", start) + 9)]
    return block


def test_the_documented_example_pass_works():
    import types

    import torch

    from tfcompile.graph import export_module
    from tfcompile.passes import apply_pass, base

    class Scaled(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x * 1.0) * 2.0

    module = types.ModuleType("mul_by_one_example")
    try:
        exec(compile(_documented_example_source(), "docs/architecture.md", "exec"), module.__dict__)
        graph = export_module(Scaled(), (torch.randn(2, 3),), name="scaled")
        rewritten, outcome = apply_pass(graph, "drop_mul_by_one")
        assert outcome.applied and outcome.reason == "removed 1 multiplications by one"
        torch.testing.assert_close(rewritten.run(), graph.run(), rtol=0, atol=0)
        _, again = apply_pass(rewritten, "drop_mul_by_one")
        assert not again.applied and again.reason == "no multiplication by 1.0"
        assert "drop_mul_by_one" in pass_order()
    finally:
        base._REGISTRY.pop("drop_mul_by_one", None)


def test_every_module_of_the_passes_package_is_imported():
    import pkgutil
    import sys

    import tfcompile.passes as passes

    names = [m.name for m in pkgutil.iter_modules(passes.__path__)]
    assert {"base", "context", "norm", "cleanup"} <= set(names)
    assert all(f"tfcompile.passes.{name}" in sys.modules for name in names)
    registered_in = {get_pass(p.name).rewrite.__module__.split(".")[2] for p in all_passes()}
    assert registered_in <= set(names)
