"""Accumulating ``index_put`` without a data race.

TVM 0.27 legalises ``index_put(data, indices, values, accumulate=True)`` (``topi.index_put``) as a
parallel loop of ``out[index[k]] += values[k]``. Where two ``k`` hit the same slot, which is what token
merging's group sums and size counts are for, two threads read, add and write the same float at once and
an addition is lost. Found in session 22: minilm b1 s128 ``tome_r8``, compiled once and run 20 times
on 2 threads, came out up to 3e-3 (relative) off torch's output in 1 to 4 of the runs, and
``benchmarks/tvm_row_kernels.py`` once saw two builds of it disagree by 100 %.

Here the copy of ``data`` stays parallel and the accumulation runs on one thread, in ``k`` order, as
torch's CPU kernel adds. Exact: the same additions in the same order as a serial loop. Indices broadcast
against each other (right-aligned, as torch's advanced indexing does) and negative ones count from the end.
A call whose shapes are not static, or whose values are not one per broadcast index, keeps TVM's
legalisation.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T


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


def _strides(shape: list[int]) -> list[int]:
    return [math.prod(shape[axis + 1:]) for axis in range(len(shape))]


def serial_index_put(data: te.Tensor, indices: list[te.Tensor], values: te.Tensor) -> te.Tensor:
    """``data`` with ``values`` added at ``indices``: the copy parallel, the additions serial in order."""
    shape = _static(data.shape)
    aligned, broadcast = _broadcast([_static(i.shape) for i in indices])
    count = math.prod(broadcast)
    broadcast_strides = _strides(broadcast)

    def body(ins, outs):
        source, *index_buffers, added = (T.buffer_proxy(buffer) for buffer in ins)
        out = T.buffer_proxy(outs[0])
        with IRBuilder() as builder:
            with T.seq_scope():
                with T.parallel(0, math.prod(shape)) as i:
                    out[i] = source[i]
                with T.serial(0, count) as k:
                    coordinates = [(k // stride) % extent for stride, extent in zip(broadcast_strides, broadcast)]
                    flat = tirx.const(0, "int64")
                    for index_buffer, index_shape, extent in zip(index_buffers, aligned, shape):
                        offset = sum((coordinate * stride for coordinate, stride, size in zip(
                            coordinates, _strides(index_shape), index_shape) if size != 1), tirx.const(0, "int64"))
                        value = index_buffer[offset].astype("int64")
                        wrapped = tirx.Select(value < 0, value + extent, value)
                        flat = flat * extent + wrapped
                    out[flat] = out[flat] + added[k]
            return builder.get()

    return te.extern([data.shape], [data, *indices, values], lambda ins, outs: body(ins, outs[0:1]),
                     dtype=data.dtype, out_buffers=[tirx.decl_buffer(data.shape, data.dtype, "out_buf")],
                     name="index_put_serial", tag="index_put_serial")


def _default(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)


def _index_put(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    data, indices, values = call.args
    fields = list(indices.fields) if isinstance(indices, relax.Tuple) else [indices]
    if not call.attrs.accumulate:
        return _default(bb, call)
    shapes = [getattr(getattr(e, "ty", None), "shape", None) for e in (data, *fields, values)]
    static = [_static(s.values) if s is not None else None for s in shapes]
    if any(s is None for s in static) or len(fields) != len(static[0]):
        return _default(bb, call)
    found = _broadcast(static[1:-1])
    if found is None or math.prod(found[1]) != math.prod(static[-1]):
        return _default(bb, call)
    return bb.call_te(serial_index_put, data, fields, values, primfunc_name_hint="index_put")


def legalize_map() -> dict:
    """Op name -> legaliser for ``relax.transform.LegalizeOps(customize_legalize_map=...)``."""
    return {"relax.index_put": _index_put}
