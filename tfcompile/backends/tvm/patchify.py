"""Lower patch-embedding convolutions (stride = kernel, no padding) as one matmul.

A ViT patch embedding is a conv2d whose kernel tiles the image without
overlap, so it is exactly a matmul: cut the image into patches
(``[N*H'*W', C*kh*kw]``, a reshape and a transpose) and multiply by the
flattened kernel. TVM legalises conv2d to a 7-deep loop nest that no
tfcompile rule schedules well (ViT-base's patch embedding ran at 3.7 GFLOP/s,
63 ms, on this project's 2-core EPYC); as a matmul it takes the vectorised
GEMM rule. The rewrite reorders no sums' terms beyond what any GEMM
blocking does, so it is exact up to float rounding.

Applies to NCHW/OIHW conv2d with a constant kernel, unit dilation, one
group, zero padding, strides equal to the kernel size and an input whose
height and width the kernel divides; anything else is left to TVM.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir.expr import GenericConst  # TVM 0.27 name of relax.Constant
from tvm.relax.expr_functor import PyExprMutator, mutator


def _ints(values) -> list[int] | None:
    out = []
    for v in values:
        if not isinstance(v, tvm.tirx.IntImm | int):
            return None
        out.append(int(v))
    return out


@mutator
class _PatchifyConv(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
            return call
        data, weight = call.args
        if isinstance(weight, relax.Var):
            weight = self.lookup_binding(weight) or weight
        attrs = call.attrs
        if not isinstance(weight, GenericConst) or attrs.groups != 1:
            return call
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
            return call
        info = getattr(data, "ty", None)
        shape = _ints(info.shape.values) if isinstance(info, relax.TensorType) and info.shape is not None else None
        kernel = weight.value.numpy()
        if shape is None or len(shape) != 4:
            return call
        batch, channels, height, width = shape
        out_channels, _, kh, kw = kernel.shape
        if (_ints(attrs.strides) != [kh, kw] or any(_ints(attrs.padding) or [1]) or _ints(attrs.dilation) != [1, 1]
                or height % kh or width % kw):
            return call
        rows, cols = height // kh, width // kw
        patches = relax.op.reshape(data, [batch, channels, rows, kh, cols, kw])
        patches = relax.op.permute_dims(patches, [0, 2, 4, 1, 3, 5])
        patches = relax.op.reshape(patches, [batch * rows * cols, channels * kh * kw])
        flat_kernel = relax.const(kernel.reshape(out_channels, -1).T.copy())
        out_dtype = str(attrs.out_dtype) if str(attrs.out_dtype) not in ("", "void") else None
        product = relax.op.matmul(patches, flat_kernel, out_dtype=out_dtype)
        product = relax.op.reshape(product, [batch, rows, cols, out_channels])
        return relax.op.permute_dims(product, [0, 3, 1, 2])


@tvm.transform.module_pass(opt_level=0, name="TfcompilePatchifyConv")
def patchify_conv(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Relax pass: non-overlapping NCHW conv2d with a constant kernel becomes reshape + matmul."""
    mod = mod.clone()
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gvar] = _PatchifyConv(mod).visit_expr(func)
    return mod
