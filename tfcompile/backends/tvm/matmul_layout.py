"""Pad matmul operands' N to a whole number of SIMD vectors; pack constant weights in panels.

The matmul schedule vectorises over N, the output's last axis, and needs a
vector width that divides it. Vocabulary projections rarely oblige (GPT-2's
LM head has N = 50257, a product of two primes), and such a kernel would run
as scalar loops while doing a third of the model's FLOPs. When the weight is a
constant, padding it with zero columns costs nothing at run time: the padded
copy is made here, once, and the result is sliced back to N (a copy of the
output, small next to the matmul).

A computed right operand (attention scores ``Q @ K^T`` over 197 ViT tokens)
is padded at run time instead: the zero columns are one more injective step
that fuses into the kernel producing ``K^T``, and without it the matmul is
scheduled as a scalar reduction (5.7 GFLOP/s against 100-200 for the
vectorised rule on this CPU).

Constant weights are also stored panel-major, ``W[K, N]`` as
``Wp[N / nr, K, nr]`` with ``nr`` the schedule's register-tile width
(``target.register_tile``: 2 or 4 vectors, by the target's register file:
16 columns on AVX2 and NEON, 64 on AVX-512), the layout optimised BLAS
libraries pack B into. The schedule walks B one ``K x nr`` panel at a time;
row-major, each of the panel's K rows is a separate ``4 nr``-byte piece
``4 N`` bytes from the next (201 KB for GPT-2's LM
head, a page or more apart), which the hardware prefetcher and the TLB serve
poorly. Packed, a panel is one contiguous block. The matmul becomes
``C[.., i, j] = sum_k A[.., i, k] * Wp[j // nr, k, j % nr]``, which the matmul
rule recognises; the packing is done here, once, at compile time.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te
from tvm.ir.expr import GenericConst  # TVM 0.27 name of relax.Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

# Narrower outputs are not worth a slice kernel.
MIN_PADDED_N = 64


def _weight(mutator_: PyExprMutator, expr: relax.Expr) -> tuple[GenericConst, bool] | None:
    """The constant behind a [K, N] matmul operand and whether it is transposed, if it is one."""
    if isinstance(expr, relax.Var):
        bound = mutator_.lookup_binding(expr)
        if bound is None:
            return None
        expr = bound
    if isinstance(expr, GenericConst):
        return (expr, False) if expr.value.ndim == 2 else None
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.permute_dims":
        inner = expr.args[0]
        axes = expr.attrs.axes
        if isinstance(inner, GenericConst) and inner.value.ndim == 2 and (axes is None or list(axes) == [1, 0]):
            return inner, True
    return None


@mutator
class _PadMatmulN(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, multiple: int, panel_width: int):
        super().__init__(mod)
        self.multiple = multiple
        self.panel_width = panel_width
        self.padded = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
            return call
        found = _weight(self, call.args[1])
        if found is None:
            return self._pad_computed(call)
        const, transposed = found
        n = int(const.value.shape[0 if transposed else 1])
        weight = const.value.numpy().T if transposed else const.value.numpy()
        if n % self.multiple == 0:
            product = self._packed_matmul(call, weight)
            return call if product is None else product
        if n < MIN_PADDED_N:
            return call
        padded = np.zeros((weight.shape[0], self._padded(n)), dtype=weight.dtype)
        padded[:, :n] = weight
        product = self._packed_matmul(call, padded)
        if product is None:
            return self._sliced_matmul(call, relax.const(padded), n)
        product = self.builder_.emit(product)
        self.padded += 1
        return relax.op.strided_slice(product, axes=[-1], begin=[0], end=[n])

    def _packed_matmul(self, call: relax.Call, weight: np.ndarray) -> relax.Expr | None:
        """``call``'s matmul by ``weight`` ([K, N], N a multiple of the vector width), stored panel-major.

        None when the operands' dtypes differ or the output is cast: TVM's own matmul handles those.
        """
        info = getattr(call.args[0], "ty", None)
        out_dtype = str(call.attrs.out_dtype)
        if (not isinstance(info, relax.TensorType) or str(info.dtype) != str(weight.dtype)
                or out_dtype not in ("", "void", str(weight.dtype))):
            return None
        k_extent, n = weight.shape
        width = next(w for w in (self.panel_width, 2 * self.multiple, self.multiple) if n % w == 0)
        packed = np.ascontiguousarray(weight.reshape(k_extent, n // width, width).transpose(1, 0, 2))
        return self.builder_.call_te(packed_matmul, call.args[0], relax.const(packed),
                                     primfunc_name_hint="matmul_packed")

    def _padded(self, n: int, multiple: int | None = None) -> int:
        multiple = multiple or self.panel_width
        return -(-n // multiple) * multiple

    def _sliced_matmul(self, call: relax.Call, right: relax.Expr, n: int) -> relax.Expr:
        out_dtype = str(call.attrs.out_dtype) or None
        if out_dtype == "void":
            out_dtype = None
        product = self.builder_.emit(relax.op.matmul(call.args[0], right, out_dtype=out_dtype))
        self.padded += 1
        return relax.op.strided_slice(product, axes=[-1], begin=[0], end=[n])

    def _pad_computed(self, call: relax.Call) -> relax.Expr:
        info = getattr(call.args[1], "ty", None)
        if not isinstance(info, relax.TensorType) or info.ndim < 2 or info.shape is None:
            return call
        last = info.shape.values[-1]
        if not isinstance(last, tvm.tirx.IntImm):
            return call
        n = int(last)
        if n % self.multiple == 0 or n < MIN_PADDED_N:
            return call
        widths = [0, 0] * (info.ndim - 1) + [0, self._padded(n, 2 * self.multiple) - n]  # two vectors: less waste
        right = self.builder_.emit(relax.op.nn.pad(call.args[1], pad_width=widths))
        return self._sliced_matmul(call, right, n)


def packed_matmul(a: te.Tensor, packed: te.Tensor) -> te.Tensor:
    """``a[.., K] @ W`` with ``W[K, N]`` stored as ``packed[N / nr, K, nr]``."""
    panels, k_extent, width = packed.shape
    k = te.reduce_axis((0, k_extent), name="k")

    def element(*index):
        *rows, j = index
        return te.sum(a[(*rows, k)] * packed[j // width, k, j % width], axis=k)

    return te.compute((*a.shape[:-1], panels * width), element, name="matmul")


def panel_width_for(multiple: int, target=None) -> int:
    """Columns per packed weight panel: the register tile's ``nr`` for ``target`` (default: the
    current target), so that the matmul rule's column tile is exactly one panel; two vectors of
    ``multiple`` when no target is known."""
    from tfcompile.backends.tvm.target import register_tile

    target = target if target is not None else tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return 2 * multiple
    width = register_tile(target).nr
    return width if width % multiple == 0 else 2 * multiple


def pad_matmul_n(multiple: int, panel_width: int | None = None) -> tvm.transform.Pass:
    """Relax pass: constant weights padded to N a multiple of the panel width and packed in panels;
    computed right operands padded at run time to a multiple of ``multiple``.

    ``panel_width`` defaults to ``panel_width_for(multiple)`` under the target current when the pass
    runs (``lowering.legalize_and_fuse`` runs it inside ``with target``)."""

    @tvm.transform.module_pass(opt_level=0, name="TfcompilePadMatmulN")
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _PadMatmulN(mod, multiple, panel_width or panel_width_for(multiple))
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        # The builder's module also holds the packed matmuls' PrimFuncs.
        return rewriter.builder_.get()

    return transform
