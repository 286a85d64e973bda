"""Where a token-indexed value's batch and sequence axes sit, before and after packing.

A value indexed by token, i.e. carrying the batch axis B and the sequence
axis L of a right-padded [B, L] batch, is held *packed*: the valid tokens only,
on leading axes (``Geometry.tok_dims``: [T] for remove_padding, [rows,
capacity] for prepack), followed by the value's other axes in their original
order. A ``Layout`` remembers where B and L sat in the original value, so each
op can be re-expressed on the packed tensor and the result put back exactly
where the original had it. The functions here are the arithmetic both the plan
(which decides) and the packer (which builds) use on layouts.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from tfcompile.passes.padding.geometry import Geometry

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the batch and sequence axes sat in an original value.

    ``axes`` is (batch axis, sequence axis), or (axis,) when a reshape flattened
    them together batch-major; the packed tensor holds the remaining axes
    (``rest_axes``) in order after the token dims."""

    shape: tuple[int, ...]
    axes: tuple[int, ...]

    @property
    def rest_axes(self) -> list[int]:
        return [i for i in range(len(self.shape)) if i not in self.axes]

    @property
    def rest(self) -> list[int]:
        return [self.shape[i] for i in self.rest_axes]


ELEMENTWISE_EXTRA = {
    aten.dropout.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default,
    aten.ones_like.default, aten.zeros_like.default, aten.full_like.default, aten.lift_fresh_copy.default,
}
RESHAPES = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints, aten.unflatten.int,
}
PERMUTES = {aten.permute.default, aten.transpose.int, aten.t.default}
VIEWS = RESHAPES | PERMUTES | {aten.expand.default, aten.slice.Tensor}
MATMULS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
NORMS = {aten.layer_norm.default, aten.rms_norm.default}
SOFTMAXES = {aten.softmax.int, aten._softmax.default, aten._log_softmax.default, aten.log_softmax.int}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}
# op -> (index of dim list, index of keepdim) for reductions over some axes.
REDUCTIONS = {
    aten.sum.dim_IntList: (1, 2), aten.mean.dim: (1, 2), aten.amax.default: (1, 2), aten.amin.default: (1, 2),
    aten.logsumexp.default: (1, 2), aten.linalg_vector_norm.default: (2, 3),
    aten.var.correction: (1, 99),  # keepdim is keyword-only there
}
# Ops that only pass on the zeros at padded positions (mask casts and views of it).
ZERO_KEEPING = {
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.alias.default,
    aten.clone.default, aten.detach.default, aten.contiguous.default, aten.dropout.default,
}


def norm_dim(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def token_dims(geometry: Geometry, layout: Layout) -> list[int]:
    """The packed token dims of a value: the geometry's, or one flat axis when B and L were flattened."""
    return list(geometry.tok_dims) if len(layout.axes) == 2 else [geometry.slots]


def packed_shape(geometry: Geometry, layout: Layout) -> list[int]:
    return token_dims(geometry, layout) + layout.rest


def packed_dim(geometry: Geometry, layout: Layout, dim: int) -> int | None:
    """Where the original axis ``dim`` sits in the packed value; None for a token axis."""
    dim = norm_dim(dim, len(layout.shape))
    if dim in layout.axes:
        return None
    return len(token_dims(geometry, layout)) + layout.rest_axes.index(dim)


def padded_token_sizes(geometry: Geometry, layout: Layout) -> list[int]:
    batch, max_len = geometry.batch, geometry.max_len
    return [batch, max_len] if len(layout.axes) == 2 else [batch * max_len]


def reshaped_layout(geometry: Geometry, layout: Layout, dst: tuple[int, ...]) -> Layout | None:
    """Where the token axes land after a row-major reshape, or None when it regroups across them.

    A reshape keeps the tokens intact when the blocks before, between and
    after the token axes keep their element counts; then reshaping the packed
    rest (the blocks back to back) is the same regrouping."""
    src, axes = layout.shape, layout.axes
    if src == dst:
        return Layout(dst, axes)
    batch, max_len = geometry.batch, geometry.max_len
    before = math.prod(src[:axes[0]])
    between = math.prod(src[axes[0] + 1:axes[1]]) if len(axes) == 2 else None
    for i in range(len(dst)):
        if math.prod(dst[:i]) != before:
            continue
        if len(axes) == 2 and dst[i] == batch:
            for j in range(i + 1, len(dst)):
                if dst[j] == max_len and math.prod(dst[i + 1:j]) == between:
                    return Layout(dst, (i, j))
        if dst[i] == batch * max_len and (len(axes) == 1 or between == 1):
            return Layout(dst, (i,))  # batch-major flattening of adjacent token axes
        if len(axes) == 1 and dst[i:i + 2] == (batch, max_len):
            return Layout(dst, (i, i + 1))
    return None


def broadcast_shape(shape: tuple[int, ...], out: Layout) -> tuple[int, ...]:
    """``shape`` with leading ones up to ``out``'s rank, as broadcasting aligns it."""
    return (1,) * (len(out.shape) - len(shape)) + tuple(shape)


def broadcasts_per_token(geometry: Geometry, shape: tuple[int, ...], out: Layout) -> bool:
    """Whether a non-token value of ``shape`` meets the token layout ``out`` as constant or per token.

    Along each token axis it must have size 1 or the padded size; then it can
    be gathered at the packed tokens' (b, j) coordinates."""
    shape = broadcast_shape(shape, out)
    sizes = [shape[a] for a in out.axes]
    return all(s in (1, f) for s, f in zip(sizes, padded_token_sizes(geometry, out)))
