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
    with pytest.raises(TfcompileError, match="layernorm_to_rmsnorm must run after fold_norm_affine"):
        check_pipeline(["layernorm_to_rmsnorm", "fold_norm_affine"])
