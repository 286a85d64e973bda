"""Row kernels on TVM (session 21): the injective rule never lets a vector span two rows it cannot divide,
and the row-reduction rule reduces a row a vector at a time.

vit-base's 197-token rows and a local-attention tile's 385 keys are divided by no vector width but 1 (197 is
prime): vectorised over the flattened nest, each lane computed its own floordiv/floormod and TVM emitted a
gather per vector (the score-mask add 4-8x, the tile copies 3-24x slower than a loop per row;
``benchmarks/tvm_row_kernels.py``). Rows a width divides are still vectorised by it.

A softmax's max and sum and a layer norm's mean ran as scalar chains, each add waiting on the one before:
factored into a vector of partial results (``rfactor``), minilm's softmax over 512 keys ran 1.95x faster
than the loop LLVM vectorises itself once allowed to reassociate.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import te, topi  # noqa: E402

from tfcompile.backends.tvm.rules import ROW_LOOP_MIN, schedule_func  # noqa: E402
from tfcompile.backends.tvm.target import host_target, vector_lanes  # noqa: E402


def _masked_scores(heads: int, rows: int, cols: int):
    """scores[h, i, j] + mask[0, 0, i, j]: a score tensor plus a mask broadcast over its heads."""
    scores = te.placeholder((heads, rows, cols), name="scores")
    mask = te.placeholder((1, 1, rows, cols), name="mask")
    out = te.compute((1, heads, rows, cols), lambda _, h, i, j: scores[h, i, j] + mask[0, 0, i, j], name="add")
    return te.create_prim_func([scores, mask, out])


def _transposed_pad(tokens: int, heads: int, head_dim: int, padded: int):
    """x[s, h * d + e] -> out[h, e, s] scaled, zero past ``tokens``: a K-transpose padded for the matmul."""
    x = te.placeholder((tokens, heads * head_dim), name="x")
    out = te.compute((heads, head_dim, padded), lambda h, e, s: tvm.tirx.if_then_else(
        s < tokens, x[tvm.te.min(s, tokens - 1), h * head_dim + e] * 0.125, 0.0), name="pad")
    return te.create_prim_func([x, out])


def _vector_widths(func) -> list[int]:
    return [int(w) for w in re.findall(r"T\.vectorized\((?:T\.int64\()?(\d+)", func.script())]


def _run(func, *shapes):
    target = host_target()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype("float32") for s in shapes[:-1]] + [np.zeros(shapes[-1], "float32")]
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*tensors)
    return arrays[:-1], tensors[-1].numpy()


@pytest.mark.parametrize("cols", [197, 385])
def test_rows_no_width_divides_keep_a_row_loop_and_compute_the_same(cols):
    scheduled, rule = schedule_func(_masked_scores(4, 33, cols), host_target())
    assert rule == "injective"
    assert _vector_widths(scheduled) == []
    script = scheduled.script()
    assert "T.parallel(132)" in script  # heads x rows, fused
    assert f"range({cols})" in script  # the row's own loop, left to LLVM's vectoriser
    (scores, mask), out = _run(scheduled, (4, 33, cols), (1, 1, 33, cols), (1, 4, 33, cols))
    np.testing.assert_array_equal(out, (scores + mask[0])[None])


def test_rows_a_width_divides_are_vectorised_by_it():
    lanes = vector_lanes(host_target())
    scheduled, rule = schedule_func(_masked_scores(4, 33, 768), host_target())
    assert rule == "injective"
    widths = _vector_widths(scheduled)
    assert widths and all(768 % w == 0 and w >= min(4 * lanes, 64) for w in widths)
    (scores, mask), out = _run(scheduled, (4, 33, 768), (1, 1, 33, 768), (1, 4, 33, 768))
    np.testing.assert_array_equal(out, (scores + mask[0])[None])


def test_a_padded_transpose_is_vectorised_within_its_rows():
    tokens, heads, head_dim, padded = 197, 4, 16, 224
    scheduled, _ = schedule_func(_transposed_pad(tokens, heads, head_dim, padded), host_target())
    assert all(padded % w == 0 for w in _vector_widths(scheduled))
    (x,), out = _run(scheduled, (tokens, heads * head_dim), (heads, head_dim, padded))
    expected = np.zeros((heads, head_dim, padded), "float32")
    expected[:, :, :tokens] = x.reshape(tokens, heads, head_dim).transpose(1, 2, 0) * np.float32(0.125)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=0)


def test_short_rows_are_still_flattened_across():
    # Rows of 3 (under ROW_LOOP_MIN) gain nothing from a loop of their own: the nest is vectorised flat.
    assert 3 < ROW_LOOP_MIN
    scheduled, _ = schedule_func(_masked_scores(4, 256, 3), host_target())
    assert _vector_widths(scheduled) and "range(3)" not in scheduled.script()
    (scores, mask), out = _run(scheduled, (4, 256, 3), (1, 1, 256, 3), (1, 4, 256, 3))
    np.testing.assert_array_equal(out, (scores + mask[0])[None])


def _softmax(rows: int, cols: int):
    x = te.placeholder((4, rows, cols), name="x")
    return te.create_prim_func([x, topi.nn.softmax(x, axis=-1)])


def _layer_norm(rows: int, width: int):
    x = te.placeholder((rows, width), name="x")
    gamma, beta = te.placeholder((width,), name="gamma"), te.placeholder((width,), name="beta")
    return te.create_prim_func([x, gamma, beta, topi.nn.layer_norm(x, gamma, beta, axis=[1], epsilon=1e-5)])


def _softmax_of(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_a_row_of_whole_vectors_is_reduced_a_vector_at_a_time():
    lanes = vector_lanes(host_target())
    scheduled, rule = schedule_func(_softmax(33, 32 * lanes), host_target())
    assert rule == "row-reduction"
    script = scheduled.script()
    assert script.count("_rf = T.sblock_alloc_buffer") == 2  # the max's and the sum's partial results
    assert lanes in _vector_widths(scheduled)
    (x,), out = _run(scheduled, (4, 33, 32 * lanes), (4, 33, 32 * lanes))
    np.testing.assert_allclose(out, _softmax_of(x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cols", [385, 8])
def test_rows_not_whole_vectors_or_one_vector_reduce_as_before(cols):
    scheduled, rule = schedule_func(_softmax(33, cols), host_target())
    assert rule == "row-reduction"
    assert "_rf" not in scheduled.script()
    (x,), out = _run(scheduled, (4, 33, cols), (4, 33, cols))
    np.testing.assert_allclose(out, _softmax_of(x), rtol=1e-5, atol=1e-7)


def test_a_layer_norm_is_factored_and_computes_the_same():
    scheduled, rule = schedule_func(_layer_norm(64, 768), host_target())
    assert rule == "row-reduction" and "_rf" in scheduled.script()
    (x, gamma, beta), out = _run(scheduled, (64, 768), (768,), (768,), (64, 768))
    x64 = x.astype(np.float64)
    normed = (x64 - x64.mean(axis=1, keepdims=True)) / np.sqrt(x64.var(axis=1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, normed * gamma + beta, rtol=1e-4, atol=1e-5)


def test_the_host_target_reassociates_float_sums_and_assumes_nothing_else():
    attrs = host_target().attrs
    assert attrs["fast-math-reassoc"]
    # Masks of -inf and the NaN guard of an all-masked row need IEEE infinities and NaNs.
    assert not any(attrs.get(flag, False) for flag in ("fast-math", "fast-math-ninf", "fast-math-nnan"))
    assert "fast-math-reassoc" not in host_target(reassociate=False).attrs


def test_a_masked_softmax_over_rows_no_width_divides_is_exact_where_masked():
    # A local-attention tile's row: 385 keys, a band of them hidden by -inf.
    scheduled, _ = schedule_func(_softmax(16, 385), host_target())
    assert "_rf" not in scheduled.script()  # left to LLVM, which may reassociate the sum
    target = host_target()
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target)
    x = np.random.default_rng(1).standard_normal((4, 16, 385)).astype("float32")
    x[:, :, 200:300] = -np.inf
    out = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), out)
    assert (out.numpy()[:, :, 200:300] == 0).all()
    np.testing.assert_allclose(out.numpy(), _softmax_of(x), rtol=1e-5, atol=1e-7)
