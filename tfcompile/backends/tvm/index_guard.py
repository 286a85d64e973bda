"""Index checks in front of TVM's gathers and scatters.

What it rewrites: before LegalizeOps lowers the Relax module (``guard_indices``), every ``take``, ``gather_elements``,
``index_tensor``, ``scatter_elements`` and ``index_put`` whose indices are computed at run time takes them
from a check kernel. The kernel counts those outside the range torch accepts for that op, stops the module
with an ``IndexError`` if there is one, and only then copies them out. Indices broadcast from a smaller tensor
are checked before the broadcast. Constant indices are checked once, here, and a bad one is a
``BackendError`` before anything is built. ``take`` in ``clip`` or ``wrap`` mode cannot go out of range and
is left alone.

Why: TVM's legalisations of these ops read and write at whatever address an index gives (``take`` in its
default ``fast`` mode, ``topi.index_put``, this package's serial scatter). A model handed in is hostile until
checked, and its indices may be computed from its inputs: out of range, a compiled gather reads past its
tensor and a compiled scatter writes over the process's memory, where torch and ONNX Runtime raise.

Ranges: ``[-n, n)`` for ``take``, ``index_tensor`` and ``index_put``, whose indices may come from torch's
advanced indexing (``x[i]``), which counts negative indices from the end; ``[0, n)`` for ``gather_elements``
and ``scatter_elements``, as torch's ``gather`` and ``scatter``. The check writes every index counted from the
start, so the kernel behind it only ever sees ``[0, n)``. One difference from torch is left: an embedding or
``index_select`` given a negative index (both lowered to ``take``) takes the row counted from the end where
torch raises; it cannot reach outside the tensor. Exact otherwise: in-range indices pass through as the op
reads them. The cost is two passes over the indices on one thread (count, then copy), which in the zoo's
variants are token ids, token positions and token-merging slots: 0.99-1.00x on token-merging variants
(``benchmarks/tvm_row_kernels.py --before index_guard``, session 23, BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import tvm
from tvm import ir, relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from tfcompile.backends.tvm.fast_math import kernel_alone
from tfcompile.backends.tvm.scatter import loop_vars
from tfcompile.errors import BackendError


def _extent(data: tirx.Buffer, axis: int | None):
    """The length of ``data`` along ``axis`` (all of it, flattened, for None)."""
    if axis is None:
        size = tirx.const(1, "int64")
        for d in data.shape:
            size = size * tirx.Cast("int64", d)
        return size
    return tirx.Cast("int64", data.shape[axis % len(data.shape)])


def _elements(shape) -> Iterator[tuple]:
    """Loop over every element of ``shape`` in the builder; yields the element's coordinates once."""
    if len(shape) == 0:
        yield ()
        return
    with T.grid(*shape) as grid:
        yield tuple(loop_vars(grid))


def checked(indices: te.Tensor, data: te.Tensor, axis: int | None, from_end: bool, what: str) -> te.Tensor:
    """``indices`` checked against ``data``'s extent on ``axis`` and written counted from the start. The
    gather or scatter reads this copy, so no pass can drop the check or run the gather before it.

    The indices out of range are counted first and the module stops if there is one; only then are they
    copied, so no kernel behind the check ever sees a bad one."""

    def body(ins, outs):
        source, out = T.buffer_proxy(ins[0]), T.buffer_proxy(outs[0])
        extent = _extent(ins[1], axis)
        low = -extent if from_end else tirx.const(0, "int64")
        message = f"{what}: an index is outside [{'-n' if from_end else '0'}, n) for n = the length of axis " \
                  f"{'(flattened)' if axis is None else axis}"
        with IRBuilder() as builder:
            with T.seq_scope():
                outside = T.buffer_proxy(T.alloc_buffer((1,), "int64", scope="local"))
                outside[0] = tirx.const(0, "int64")
                for at in _elements(indices.shape):
                    value = source[at].astype("int64")
                    outside[0] = outside[0] + tirx.Select(tirx.any(value < low, value >= extent),
                                                          tirx.const(1, "int64"), tirx.const(0, "int64"))
                with T.Assert(outside[0] == 0, message, "IndexError"):
                    for at in _elements(indices.shape):
                        value = source[at].astype("int64")
                        out[at] = tirx.Select(value < 0, value + extent, value).astype(indices.dtype)
            return builder.get()

    return te.extern([indices.shape], [indices, data], body, dtype=indices.dtype,
                     out_buffers=[tirx.decl_buffer(indices.shape, indices.dtype, "checked_indices")],
                     name="index_check", tag="index_check")


def _extent_now(data: relax.Expr, axis: int | None) -> int | None:
    shape = getattr(getattr(data, "ty", None), "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(d, tirx.IntImm) for d in values):
        return None
    if axis is None:
        return int(np.prod([int(d) for d in values]))
    return int(values[axis % len(values)])


def _guard(bb: relax.BlockBuilder, lookup, op: str, data: relax.Expr, indices: relax.Expr, axis: int | None,
           from_end: bool) -> relax.Expr:
    """``indices`` as the op should take them: checked now if constant, else through a check kernel.

    Indices broadcast from a smaller tensor (token merging's ``idx.expand(B, r, C)``) are checked before
    the broadcast, which stays fusable into the gather: checked after it, [B, r, C] indices were written
    out, read twice and copied (vit-base b4 ``tome_r8`` ran 0.95x its time without the check)."""
    bound = lookup(indices) if isinstance(indices, relax.Var) else None
    if isinstance(bound, relax.Call) and isinstance(bound.op, ir.Op) and bound.op.name == "relax.broadcast_to":
        source = _guard(bb, lookup, op, data, bound.args[0], axis, from_end)
        return bb.emit(relax.op.broadcast_to(source, bound.args[1]))
    if isinstance(indices, ir.expr.Constant):
        extent = _extent_now(data, axis)
        values = indices.value.numpy()
        low = -extent if from_end else 0
        if extent is not None and values.size and (values.min() < low or values.max() >= extent):
            raise BackendError(f"tvm: {op}: a constant index is outside [{low}, {extent}) on axis {axis}")
        if extent is not None:
            return relax.const(np.where(values < 0, values + extent, values).astype(values.dtype))
    result = bb.call_te(checked, indices, data, axis, from_end, op, primfunc_name_hint="index_check")
    # A kernel of its own: fused, its loop would be merged into the producer's and the take's (FuseTIR then
    # fails on the two buffers it maps to one value), and nothing must run before its check has passed. Its
    # two loops on one thread are its schedule: the rules have nothing to add.
    return bb.emit(kernel_alone(bb, result, scheduled=True))


GUARDED_OPS = ("relax.take", "relax.gather_elements", "relax.scatter_elements", "relax.index_tensor",
               "relax.index_put")


@mutator
class _IndexGuard(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, ir.Op) or call.op.name not in GUARDED_OPS:
            return call
        name, bb, args = call.op.name, self.builder_, list(call.args)
        op = name.removeprefix("relax.")

        def guard(indices, axis, from_end):
            return _guard(bb, self.lookup_binding, op, args[0], indices, axis, from_end)

        if name == "relax.take":
            if str(call.attrs.mode) != "fast":  # clip and wrap cannot leave the tensor
                return call
            args[1] = guard(args[1], None if call.attrs.axis is None else int(call.attrs.axis), True)
        elif name in ("relax.gather_elements", "relax.scatter_elements"):
            args[1] = guard(args[1], int(call.attrs.axis), False)
        else:  # index_tensor, index_put: one index tensor per leading axis
            fields = (list(args[1].fields) if isinstance(args[1], relax.Tuple)
                      else [bb.emit(relax.TupleGetItem(args[1], k)) for k in range(len(args[1].ty.fields))])
            args[1] = relax.Tuple([guard(field, axis, True) for axis, field in enumerate(fields)])
        return relax.Call(call.op, args, call.attrs, call.ty_args, call.span)


@tvm.transform.module_pass(opt_level=0, name="TfcompileGuardIndices")
def guard_indices(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Every gather's and scatter's computed indices through a check kernel (run before LegalizeOps)."""
    guard = _IndexGuard(mod)
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            guard.builder_.update_func(gvar, guard.visit_expr(func))
    return guard.builder_.get()
