"""Column reductions on TVM (session 22): a sum over middle axes runs with the kept axis innermost.

Token merging scores keys by the attention they receive, ``probs.sum((1, 2))`` over [B, H, Q, K]. Taken as
B x K rows each reducing over (h, q), every step read a float K floats from the last, and at batch 1 one
thread did all of it (minilm's 12 x 512 x 512: 8.5 ms alone on the EPYC of session 22).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import te, topi  # noqa: E402

from tfcompile.backends.tvm.rules import schedule_func  # noqa: E402
from tfcompile.backends.tvm.target import host_target  # noqa: E402


def _reduced(shape, axes, reduce=topi.sum):
    x = te.placeholder(shape, name="x")
    return te.create_prim_func([x, reduce(x, axis=axes)])


def _run(func, shape, out_shape):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=host_target())
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](tvm.runtime.tensor(x), out)
    return x, out.numpy()


@pytest.mark.parametrize("shape", [(1, 4, 64, 128), (8, 3, 29, 116), (2, 3, 17, 197)],
                         ids=["batch1-k128", "batch8-k116", "batch2-k197"])
def test_attention_received_per_key_is_a_column_reduction_and_matches_float64(shape):
    scheduled, rule = schedule_func(_reduced(shape, (1, 2)), host_target())
    assert rule == "column-reduction"
    text = scheduled.script()
    assert "T.parallel" in text  # batch 1 too: the kept axis is cut into parallel chunks
    # the init is hoisted out of the reduction loops, so the innermost loop is the kept axis's plain add
    assert "x_red_init" in text and "x_red_update" in text
    x, out = _run(scheduled, shape, (shape[0], shape[3]))
    np.testing.assert_allclose(out, x.astype("float64").sum(axis=(1, 2)), rtol=1e-5, atol=1e-4)


def test_token_pooling_sum_and_a_max_over_a_middle_axis_are_column_reductions():
    for shape, reduce, reference in (((8, 128, 384), topi.sum, np.sum), ((4, 50, 96), topi.max, np.max)):
        scheduled, rule = schedule_func(_reduced(shape, (1,), reduce), host_target())
        assert rule == "column-reduction", reduce
        x, out = _run(scheduled, shape, (shape[0], shape[2]))
        np.testing.assert_allclose(out, reference(x.astype("float64"), axis=1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("axes", [(3,), (2, 3)], ids=["last", "last-two"])
def test_reductions_over_the_innermost_axis_stay_row_reductions(axes):
    shape = (2, 3, 16, 64)
    scheduled, rule = schedule_func(_reduced(shape, axes), host_target())
    assert rule == "row-reduction"
    x, out = _run(scheduled, shape, tuple(d for i, d in enumerate(shape) if i not in axes))
    np.testing.assert_allclose(out, x.astype("float64").sum(axis=axes), rtol=1e-5, atol=1e-4)
