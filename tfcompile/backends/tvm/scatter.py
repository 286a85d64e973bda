"""Accumulating ``index_put`` without a data race.

TVM 0.27 legalises ``index_put(data, indices, values, accumulate=True)`` (``topi.index_put``) as a
parallel loop of ``out[index[k]] += values[k]``. Where two ``k`` hit the same slot, which is what token
merging's group sums and size counts are for, two threads read, add and write the same float at once and
an addition is lost. Found in session 22 (ad-hoc runs): minilm b1 s128 ``tome_r8``, compiled once and run
20 times on 2 threads, came out up to 3e-3 (relative) off torch's output in 1 to 4 of the runs, and
``benchmarks/tvm_row_kernels.py`` once stopped on two builds of it disagreeing by 100 %.

Here the copy of ``data`` stays parallel and the accumulation runs on one thread, in ``k`` order, as
torch's CPU kernel adds. Exact: the same additions in the same order as a serial loop. Indices broadcast
against each other (right-aligned, as torch's advanced indexing does) and negative ones count from the end.
A call whose shapes are not static, or whose values do not have the broadcast index shape, keeps TVM's
legalisation.
"""

from __future__ import annotations

from tvm import relax, te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from tfcompile.backends.tvm.fast_math import tvm_legalization


def _static(shape) -> list[int] | None:
    return [int(d) for d in shape] if all(isinstance(d, tirx.IntImm) for d in shape) else None


def _broadcast(shapes: list[list[int]]) -> tuple[list[list[int]], list[int]] | None:
    """The index shapes right-aligned to one rank, and the shape they broadcast to (None: they do not)."""
    rank = max(len(s) for s in shapes)
    aligned = [[1] * (rank - len(s)) + s for s in shapes]
    result = []
    for extents in zip(*aligned):
        wide = {e for e in extents if e != 1}
        if len(wide) > 1:
            return None
        result.append(wide.pop() if wide else 1)
    return aligned, result


def loop_vars(frame) -> list:
    """``T.grid``'s loop variables as a list (an array of them, or a bare variable for one extent)."""
    try:
        return list(frame)
    except TypeError:  # a variable is not iterable
        return [frame]


def serial_index_put(data: te.Tensor, indices: list[te.Tensor], values: te.Tensor) -> te.Tensor:
    """``data`` with ``values`` added at ``indices``: the copy parallel, the additions serial in order.

    Loops nest over the broadcast index shape, so no index is divided out of a flat counter (64-bit
    divisions per element made TVM's flat loop cost more than the additions)."""
    shape = _static(data.shape)
    index_shapes = [_static(i.shape) for i in indices]
    aligned, broadcast = _broadcast(index_shapes)

    def body(ins, outs):
        source, *index_buffers, added = (T.buffer_proxy(buffer) for buffer in ins)
        out = T.buffer_proxy(outs[0])
        with IRBuilder() as builder:
            with T.seq_scope():
                with T.parallel(0, shape[0]) as first:
                    if len(shape) > 1:
                        with T.grid(*shape[1:]) as rest:
                            element = (first, *loop_vars(rest))
                            out[element] = source[element]
                    else:
                        out[first] = source[first]
                with T.grid(*broadcast) as grid:
                    coordinates = loop_vars(grid)
                    slot = []
                    for index_buffer, own, padded, extent in zip(index_buffers, index_shapes, aligned, shape):
                        at = [c if size != 1 else 0 for c, size in zip(coordinates, padded)][len(padded) - len(own):]
                        value = index_buffer[tuple(at)].astype("int64")
                        slot.append(tirx.Select(value < 0, value + extent, value))
                    out[tuple(slot)] = out[tuple(slot)] + added[tuple(coordinates)]
            return builder.get()

    return te.extern([data.shape], [data, *indices, values], body,
                     dtype=data.dtype, out_buffers=[tirx.decl_buffer(data.shape, data.dtype, "out_buf")],
                     name="index_put_serial", tag="index_put_serial")


def _index_put(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    data, indices, values = call.args
    fields = list(indices.fields) if isinstance(indices, relax.Tuple) else [indices]
    if not call.attrs.accumulate:
        return tvm_legalization(bb, call)
    shapes = [getattr(getattr(e, "ty", None), "shape", None) for e in (data, *fields, values)]
    static = [_static(s.values) if s is not None else None for s in shapes]
    if any(s is None for s in static) or len(fields) != len(static[0]):
        return tvm_legalization(bb, call)
    found = _broadcast(static[1:-1])
    if found is None or found[1] != static[-1]:
        return tvm_legalization(bb, call)  # values not one per broadcast index, in its shape
    return bb.call_te(serial_index_put, data, fields, values, primfunc_name_hint="index_put")


def legalize_map() -> dict:
    """Op name -> legaliser for ``relax.transform.LegalizeOps(customize_legalize_map=...)``."""
    return {"relax.index_put": _index_put}
