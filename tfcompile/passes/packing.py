"""The packed-execution rewriter behind ``remove_padding`` and ``prepack``.

``Packer`` walks the original graph once and builds a new one in which every
value that is indexed by token, i.e. carries the batch axis B and the sequence
axis L of a right-padded [B, L] batch, is held *packed*: the valid tokens only,
on leading axes (``Geometry.tok_dims``: [T] for remove_padding, [rows,
capacity] for prepack), followed by the value's other axes in their original
order. A ``Layout`` remembers where B and L sat in the original value, so each
op can be re-expressed on the packed tensor and the result put back exactly
where the original had it.

Values that are not indexed by token (weights, the mask construction, pooled
sentence vectors) are copied unchanged. A non-token value that meets a packed
one in a broadcasting op is gathered at the packed tokens' (b, j) coordinates,
which is how position and token-type embeddings travel with their tokens.

Only ops with a rule below may touch a packed value; any other op raises
``Refusal`` naming the node, so an unknown op never silently mixes tokens.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch.fx.node import map_arg

from tfcompile.graph import ModelGraph
from tfcompile import structure

if TYPE_CHECKING:
    from tfcompile.passes.padding import Geometry

aten = torch.ops.aten


class Refusal(Exception):
    """A precondition does not hold; the message is the reason given to the user."""


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


@dataclasses.dataclass
class Packed:
    node: torch.fx.Node
    layout: Layout | list[Layout]  # a list for the outputs of split / chunk / unbind


def _shape(node) -> tuple[int, ...]:
    value = node.meta.get("val")
    return tuple(int(s) for s in value.shape)


def _norm_dim(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    return structure.dim_arg(node, index, name, default)


def _op_name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


_ELEMENTWISE_EXTRA = {
    aten.dropout.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default,
    aten.ones_like.default, aten.zeros_like.default, aten.full_like.default, aten.lift_fresh_copy.default,
}
_RESHAPES = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints, aten.unflatten.int,
}
_VIEWS = _RESHAPES | {aten.permute.default, aten.transpose.int, aten.t.default, aten.expand.default,
                      aten.slice.Tensor}
# op -> (index of dim list, index of keepdim) for reductions over some axes.
_REDUCTIONS = {
    aten.sum.dim_IntList: (1, 2), aten.mean.dim: (1, 2), aten.amax.default: (1, 2), aten.amin.default: (1, 2),
    aten.logsumexp.default: (1, 2), aten.linalg_vector_norm.default: (2, 3),
    aten.var.correction: (1, 99),  # keepdim is keyword-only there
}
# Ops that only pass on the zeros at padded positions (mask casts and views of it).
_ZERO_KEEPING = {
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.alias.default,
    aten.clone.default, aten.detach.default, aten.contiguous.default, aten.dropout.default,
}
_MIXING_HINTS = {
    "convolution": "a sequence convolution mixes neighbouring tokens",
    "conv1d": "a sequence convolution mixes neighbouring tokens",
    "batch_norm": "BatchNorm mixes statistics across tokens",
    "cumsum": "a cumulative sum runs across tokens",
}


class Packer:
    """Builds the packed graph. ``patterns[sdpa]`` is 'full' or 'causal' (within a sequence);
    ``zero_pad`` holds original nodes known to be zero at every padded position."""

    def __init__(self, graph: ModelGraph, geometry: Geometry, token_inputs: list[torch.fx.Node],
                 patterns: dict[torch.fx.Node, str], zero_pad: dict[torch.fx.Node, tuple[int, ...]]):
        self.gm = graph.gm
        self.src = graph.gm.graph
        self.geo = geometry
        self.seeds = set(token_inputs)
        self.patterns = patterns
        self.zero_pad = dict(zero_pad)
        self.new = torch.fx.Graph()
        self.new.set_codegen(self.src._codegen)
        self.plain: dict[torch.fx.Node, torch.fx.Node] = {}
        self.packed: dict[torch.fx.Node, Packed] = {}
        self.consts: dict[str, torch.fx.Node] = {}
        self.cur: torch.fx.Node | None = None
        self.attention_calls = 0

    # -- building blocks -------------------------------------------------------------------------
    def call(self, target, args, kwargs=None) -> torch.fx.Node:
        node = self.new.call_function(target, tuple(args), kwargs or {})
        if self.cur is not None and "nn_module_stack" in self.cur.meta:
            node.meta["nn_module_stack"] = self.cur.meta["nn_module_stack"]
        return node

    def const(self, key: str, make) -> torch.fx.Node:
        if key not in self.consts:
            name = structure.add_constant(self.gm, f"packing_{key}", make())
            self.consts[key] = self.new.get_attr(name)
        return self.consts[key]

    def tok(self, layout: Layout) -> list[int]:
        return list(self.geo.tok_dims) if len(layout.axes) == 2 else [self.geo.slots]

    def reshape(self, node: torch.fx.Node, shape: list[int], current: list[int] | None = None) -> torch.fx.Node:
        if current is not None and list(current) == list(shape):
            return node
        return self.call(aten.reshape.default, (node, list(shape)))

    def packed_shape(self, layout: Layout) -> list[int]:
        return self.tok(layout) + layout.rest

    def packed_dim(self, layout: Layout, dim: int) -> int | None:
        dim = _norm_dim(dim, len(layout.shape))
        if dim in layout.axes:
            return None
        return len(self.tok(layout)) + layout.rest_axes.index(dim)

    def _token_sizes(self, layout: Layout) -> list[int]:
        b, l = self.geo.batch, self.geo.max_len
        return [b, l] if len(layout.axes) == 2 else [b * l]

    def is_packed(self, node) -> bool:
        return isinstance(node, torch.fx.Node) and (node in self.packed or node in self.seeds)

    def get_packed(self, node: torch.fx.Node) -> Packed:
        if node not in self.packed:
            # A token input (ids) is gathered where it is first used, so unused inputs cost nothing.
            shape = _shape(node)
            layout = Layout(shape, (0, 1))
            flat = self.reshape(self.plain[node], [shape[0] * shape[1]] + list(shape[2:]))
            index = self.const("gather_index", self.geo.gather_index)
            picked = self.call(aten.index_select.default, (flat, 0, index))
            self.packed[node] = Packed(self.reshape(picked, self.packed_shape(layout),
                                                    [self.geo.slots] + list(shape[2:])), layout)
        return self.packed[node]

    def refuse(self, why: str):
        node = self.cur
        raise Refusal(f"{node.name} ({_op_name(node)}) {why}")

    # -- the walk --------------------------------------------------------------------------------
    def build(self) -> torch.fx.Graph:
        for node in self.src.nodes:
            self.cur = node
            if node.op in ("placeholder", "get_attr"):
                self.plain[node] = self.new.node_copy(node)
            elif node.op == "output":
                self.new.node_copy(node, self._output_arg)
            elif node.op == "call_function" and any(self.is_packed(a) for a in node.all_input_nodes) and not (
                    node.target in structure.METADATA_OPS and all(a in self.plain for a in node.all_input_nodes)):
                try:
                    self._packed_op(node)
                except Refusal:
                    # A token input used where it cannot be packed (e.g. ids in a cumsum) is
                    # computed padded, exactly as before; it is gathered again if it meets tokens.
                    if not all(a in self.plain for a in node.all_input_nodes):
                        raise
                    self.plain[node] = self.new.node_copy(node, self.plain.__getitem__)
                    self._mark_zero_pad(node)
            else:
                missing = [a for a in node.all_input_nodes if a not in self.plain]
                if missing:
                    self.refuse(f"reads the token-indexed value {missing[0].name} as a whole")
                self.plain[node] = self.new.node_copy(node, self.plain.__getitem__)
                self._mark_zero_pad(node)
        return self.new

    def _output_arg(self, node: torch.fx.Node) -> torch.fx.Node:
        if node in self.plain:
            return self.plain[node]
        return self.unpack(self.packed[node])

    def _zero_axes(self, arg, rank: int) -> tuple[int, ...] | None:
        """The token axes, in a rank-``rank`` result, of ``arg`` if it is zero at padded positions."""
        if not isinstance(arg, torch.fx.Node) or arg not in self.zero_pad:
            return None
        axes = self.zero_pad[arg]
        return tuple(a + rank - len(_shape(arg)) for a in axes)

    def _mark_zero_pad(self, node: torch.fx.Node, axes: tuple[int, ...] | None = None) -> None:
        """Record whether ``node`` is zero at padded positions, and on which axes (b, j) lie.

        ``axes`` is the packed result's layout; for a plain value only casts,
        trailing unsqueezes and products keep track of where the zeros are."""
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return
        rank = len(_shape(node)) if isinstance(node.meta.get("val"), torch.Tensor) else -1
        first = self._zero_axes(node.args[0], rank)
        target = node.target
        if target in _ZERO_KEEPING or (axes is not None and target in _VIEWS):
            found = first if axes is None else (axes if first is not None else None)
        elif target is aten.unsqueeze.default and axes is None:
            dim = _norm_dim(node.args[1], rank)
            found = None if first is None else tuple(a - 1 + (a - 1 >= dim) for a in first)
        elif target is aten.mul.Tensor:
            found = first if first is not None else self._zero_axes(node.args[1], rank)
        elif target is aten.div.Tensor:
            found = first
        else:
            found = None
        if found is not None and (axes is None or found == axes):
            self.zero_pad[node] = found

    def unpack(self, packed: Packed) -> torch.fx.Node:
        """Scatter back to the original layout, zeros at padded positions."""
        layout = packed.layout
        rest = layout.rest
        flat = self.reshape(packed.node, [self.geo.slots] + rest, self.packed_shape(layout))
        zero = self.call(aten.new_zeros.default, (flat, [1] + rest))
        extended = self.call(aten.cat.default, ([flat, zero], 0))
        index = self.const("scatter_index", self.geo.scatter_index)
        full = self.call(aten.index_select.default, (extended, 0, index))
        shaped = self.reshape(full, self._token_sizes(layout) + rest)
        order = list(layout.axes) + layout.rest_axes
        perm = [order.index(i) for i in range(len(layout.shape))]
        if perm != list(range(len(perm))):
            shaped = self.call(aten.permute.default, (shaped, perm))
        return shaped

    def broadcast_pack(self, node: torch.fx.Node, out: Layout) -> torch.fx.Node:
        """A non-token value that broadcasts against the token layout ``out``, packed to match."""
        shape = _shape(node)
        value = self.plain[node]
        rank = len(out.shape)
        lead = rank - len(shape)
        if lead:
            value = self.reshape(value, [1] * lead + list(shape))
            shape = (1,) * lead + shape
        full = self._token_sizes(out)
        sizes = [shape[a] for a in out.axes]
        rest_shape = [shape[i] for i in out.rest_axes]
        if all(s == 1 for s in sizes):
            # Constant over the tokens: drop those axes and let broadcasting do the rest.
            return self.reshape(value, rest_shape)
        if any(s not in (1, f) for s, f in zip(sizes, full)):
            self.refuse(f"broadcasts {node.name} of shape {list(shape)} against the token axes")
        keep = [a for a, s in zip(out.axes, sizes) if s != 1]
        drop = [a for a, s in zip(out.axes, sizes) if s == 1]
        perm = keep + out.rest_axes + drop
        if perm != list(range(rank)):
            value = self.call(aten.permute.default, (value, perm))
        value = self.reshape(value, [math.prod(shape[a] for a in keep)] + rest_shape)
        if len(out.axes) == 1:
            index = self.const("gather_index", self.geo.gather_index)
        elif len(keep) == 2:
            index = self.const("gather_index", self.geo.gather_index)
        elif keep[0] == out.axes[0]:
            index = self.const("slot_batch", self.geo.slot_batch)
        else:
            index = self.const("slot_position", self.geo.slot_position)
        picked = self.call(aten.index_select.default, (value, 0, index))
        return self.reshape(picked, self.tok(out) + rest_shape, [self.geo.slots] + rest_shape)

    def set_packed(self, node: torch.fx.Node, new: torch.fx.Node, layout) -> None:
        self.packed[node] = Packed(new, layout)
        if isinstance(layout, Layout):
            self._mark_zero_pad(node, layout.axes)

    # -- per-op rules ----------------------------------------------------------------------------
    def _packed_op(self, node: torch.fx.Node) -> None:
        target = node.target
        if target in structure.METADATA_OPS:
            return  # asserts the traced (padded) metadata, which packing changes on purpose
        if target is operator.getitem:
            source = self.get_packed(node.args[0])
            self.set_packed(node, self.call(operator.getitem, (source.node, node.args[1])),
                            source.layout[node.args[1]])
            return
        if target is aten.scaled_dot_product_attention.default:
            return self._attention(node)
        if target in _RESHAPES:
            return self._reshape(node)
        if target in (aten.permute.default, aten.transpose.int, aten.t.default):
            return self._permute(node)
        if target is aten.expand.default:
            return self._expand(node)
        if target in (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default):
            return self._matmul(node)
        if target is aten.embedding.default:
            idx = self.get_packed(node.args[1])
            if self.is_packed(node.args[0]):
                self.refuse("looks up a token-indexed table")
            new = self.call(target, (self.plain[node.args[0]], idx.node, *node.args[2:]), node.kwargs)
            return self.set_packed(node, new, Layout(_shape(node), idx.layout.axes))
        if target in (aten.layer_norm.default, aten.rms_norm.default):
            x = self.get_packed(node.args[0])
            if max(x.layout.axes) >= len(x.layout.shape) - len(node.args[1]):
                self.refuse("normalises over the token axes")
            args = [x.node] + [self._plain_arg(a) for a in node.args[1:]]
            return self.set_packed(node, self.call(target, args, node.kwargs), Layout(_shape(node), x.layout.axes))
        if target in (aten.softmax.int, aten._softmax.default, aten._log_softmax.default, aten.log_softmax.int):
            x = self.get_packed(node.args[0])
            dim = self._map_dim(x.layout, node.args[1], "normalises over the sequence")
            new = self.call(target, (x.node, dim, *node.args[2:]), node.kwargs)
            return self.set_packed(node, new, x.layout)
        if target in _REDUCTIONS:
            return self._reduce(node)
        if target in (aten.slice.Tensor, aten.select.int):
            return self._slice(node)
        if target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int):
            return self._split(node)
        if target is aten.cat.default:
            return self._cat(node)
        if target is aten.index_select.default:
            x = self.get_packed(node.args[0])
            dim = self._map_dim(x.layout, node.args[1], "indexes along the sequence")
            new = self.call(target, (x.node, dim, self._plain_arg(node.args[2])))
            return self.set_packed(node, new, Layout(_shape(node), x.layout.axes))
        if target in _ELEMENTWISE_EXTRA or (hasattr(target, "tags") and torch.Tag.pointwise in target.tags):
            if target is aten.dropout.default and _arg(node, 2, "train", False):
                self.refuse("is dropout in training mode")
            return self._elementwise(node)
        name = _op_name(node)
        hint = next((h for key, h in _MIXING_HINTS.items() if key in name), None)
        self.refuse(f"{hint or 'has no token-wise rule'}: padding removal needs every op except "
                    "attention (and masked pooling) to act on each token alone")

    def _plain_arg(self, arg):
        if isinstance(arg, torch.fx.Node):
            if self.is_packed(arg) and arg not in self.plain:
                self.refuse(f"takes the token-indexed {arg.name} as a parameter")
            return self.plain[arg]
        return map_arg(arg, lambda a: self.plain[a]) if isinstance(arg, (list, tuple)) else arg

    def _map_dim(self, layout: Layout, dim: int, why: str) -> int:
        mapped = self.packed_dim(layout, dim)
        if mapped is None:
            self.refuse(why)
        return mapped

    def _elementwise(self, node: torch.fx.Node) -> None:
        out_shape = _shape(node)
        rank = len(out_shape)
        axes = None
        for arg in node.all_input_nodes:
            if self.is_packed(arg):
                layout = self.get_packed(arg).layout
                shifted = tuple(a + rank - len(layout.shape) for a in layout.axes)
                if axes is not None and shifted != axes:
                    self.refuse("combines values whose token axes do not line up")
                axes = shifted
        out = Layout(out_shape, axes)

        def convert(arg: torch.fx.Node) -> torch.fx.Node:
            if not self.is_packed(arg):
                return self.broadcast_pack(arg, out)
            packed = self.get_packed(arg)
            missing = len(out.rest) - len(packed.layout.rest)
            if missing:
                return self.reshape(packed.node, self.tok(out) + [1] * missing + packed.layout.rest)
            return packed.node

        new = self.call(node.target, map_arg(node.args, convert), map_arg(node.kwargs, convert))
        self.set_packed(node, new, out)

    def _reshape(self, node: torch.fx.Node) -> None:
        x = self.get_packed(node.args[0])
        src, dst = x.layout.shape, _shape(node)
        out = self._reshaped_layout(x.layout, dst)
        if out is None:
            self.refuse(f"reshapes {list(src)} to {list(dst)} across the token axes")
        new = self.reshape(x.node, self.packed_shape(out), self.packed_shape(x.layout))
        self.set_packed(node, new, out)

    def _reshaped_layout(self, layout: Layout, dst: tuple[int, ...]) -> Layout | None:
        """Where the token axes land after a row-major reshape, or None when it regroups across them.

        A reshape keeps the tokens intact when the blocks before, between and
        after the token axes keep their element counts; then reshaping the packed
        rest (the blocks back to back) is the same regrouping."""
        src, axes = layout.shape, layout.axes
        if src == dst:
            return Layout(dst, axes)
        b, l = self.geo.batch, self.geo.max_len
        before = math.prod(src[:axes[0]])
        between = math.prod(src[axes[0] + 1:axes[1]]) if len(axes) == 2 else None
        for i in range(len(dst)):
            if math.prod(dst[:i]) != before:
                continue
            if len(axes) == 2 and dst[i] == b:
                for j in range(i + 1, len(dst)):
                    if dst[j] == l and math.prod(dst[i + 1:j]) == between:
                        return Layout(dst, (i, j))
            if dst[i] == b * l and (len(axes) == 1 or between == 1):
                return Layout(dst, (i,))  # batch-major flattening of adjacent token axes
            if len(axes) == 1 and dst[i:i + 2] == (b, l):
                return Layout(dst, (i, i + 1))
        return None

    def _permute(self, node: torch.fx.Node) -> None:
        x = self.get_packed(node.args[0])
        rank = len(x.layout.shape)
        if node.target is aten.permute.default:
            perm = [_norm_dim(d, rank) for d in node.args[1]]
        else:
            perm = list(range(rank))
            if node.target is aten.transpose.int:
                a, c = _norm_dim(node.args[1], rank), _norm_dim(node.args[2], rank)
            else:
                a, c = (0, 1) if rank == 2 else (0, 0)  # aten.t
            perm[a], perm[c] = perm[c], perm[a]
        out = Layout(_shape(node), tuple(perm.index(a) for a in x.layout.axes))
        ntok = len(self.tok(x.layout))
        inner = list(range(ntok)) + [ntok + x.layout.rest_axes.index(perm[i]) for i in out.rest_axes]
        new = x.node if inner == list(range(len(inner))) else self.call(aten.permute.default, (x.node, inner))
        self.set_packed(node, new, out)

    def _expand(self, node: torch.fx.Node) -> None:
        x = self.get_packed(node.args[0])
        dst = _shape(node)
        lead = len(dst) - len(x.layout.shape)
        out = Layout(dst, tuple(a + lead for a in x.layout.axes))
        if any(dst[a] != x.layout.shape[a - lead] for a in out.axes):
            self.refuse("broadcasts along the token axes")
        value = self.reshape(x.node, self.tok(x.layout) + [1] * lead + x.layout.rest, self.packed_shape(x.layout))
        self.set_packed(node, self.call(aten.expand.default, (value, self.packed_shape(out))), out)

    def _matmul(self, node: torch.fx.Node) -> None:
        target = node.target
        x_index = 1 if target is aten.addmm.default else 0
        x = self.get_packed(node.args[x_index])
        others = [a for i, a in enumerate(node.args) if i != x_index]
        if any(self.is_packed(a) for a in others if isinstance(a, torch.fx.Node)):
            self.refuse("multiplies two token-indexed values (only attention may)")
        rank = len(x.layout.shape)
        if rank - 1 in x.layout.axes:
            self.refuse("contracts over the token axes")
        if target in (aten.mm.default, aten.matmul.default) and len(_shape(node.args[1])) > 2:
            self.refuse("is a batched matmul over token-indexed operands")
        args = [x.node if i == x_index else self._plain_arg(a) for i, a in enumerate(node.args)]
        out = Layout(_shape(node), x.layout.axes)
        self.set_packed(node, self.call(target, args, node.kwargs), out)

    def _reduce(self, node: torch.fx.Node) -> None:
        x = self.get_packed(node.args[0])
        rank = len(x.layout.shape)
        dim_index, keep_index = _REDUCTIONS[node.target]
        dims = _arg(node, dim_index, "dim")
        keepdim = bool(_arg(node, keep_index, "keepdim", False))
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            self.refuse("reduces over every axis, tokens included")
        dims = [_norm_dim(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        token_dims = [d for d in dims if d in x.layout.axes]
        if token_dims:
            return self._pool(node, x, dims, keepdim)
        mapped = [self.packed_dim(x.layout, d) for d in dims]
        args = list(node.args)
        kwargs = dict(node.kwargs)
        if len(args) > dim_index:
            args[dim_index] = mapped
        else:
            kwargs["dim"] = mapped
        args[0] = x.node
        axes = x.layout.axes if keepdim else tuple(a - sum(d < a for d in dims) for a in x.layout.axes)
        self.set_packed(node, self.call(node.target, args, kwargs), Layout(_shape(node), axes))

    def _per_sequence(self, node: torch.fx.Node, x: Packed, pieces: list[torch.fx.Node], keepdim: bool) -> None:
        """Stack one [rest] piece per sequence into the original (non-token) result."""
        b_axis, l_axis = x.layout.axes
        stacked = self.call(aten.stack.default, (pieces, 0))  # [B] + rest
        kept = [i for i in range(len(x.layout.shape)) if i != l_axis]
        order = [b_axis] + x.layout.rest_axes  # original axis held by each stacked axis
        perm = [order.index(i) for i in kept]
        if perm != list(range(len(perm))):
            stacked = self.call(aten.permute.default, (stacked, perm))
        if keepdim:
            stacked = self.call(aten.unsqueeze.default, (stacked, l_axis))
        self.plain[node] = stacked

    def _pool(self, node: torch.fx.Node, x: Packed, dims: list[int], keepdim: bool) -> None:
        if len(x.layout.axes) != 2 or len(self.geo.tok_dims) != 1:
            self.refuse("pools over flattened or binned tokens")
        if dims != [x.layout.axes[1]]:
            self.refuse("reduces over the batch axis")
        if node.target is not aten.sum.dim_IntList or _arg(node, 3, "dtype") is not None:
            self.refuse("pools over the sequence including padded positions (only a sum of "
                        "mask-weighted values ignores them)")
        if self._zero_axes(node.args[0], len(x.layout.shape)) != x.layout.axes:
            self.refuse("sums over the sequence and padded positions are not masked to zero "
                        "before it (pooling before unpacking)")
        # Padded positions hold exact zeros in the original sum, so summing each
        # sequence's own tokens gives the same value up to summation order.
        pieces = []
        for start, length in zip(self.geo.starts, self.geo.lengths):
            piece = self.call(aten.slice.Tensor, (x.node, 0, start, start + length))
            pieces.append(self.call(aten.sum.dim_IntList, (piece, [0])))
        self._per_sequence(node, x, pieces, keepdim)

    def _slice(self, node: torch.fx.Node) -> None:
        x = self.get_packed(node.args[0])
        rank = len(x.layout.shape)
        dim = _norm_dim(_arg(node, 1, "dim", 0), rank)
        if node.target is aten.slice.Tensor:
            if dim in x.layout.axes:
                start, end = _arg(node, 2, "start") or 0, _arg(node, 3, "end")
                size = x.layout.shape[dim]
                if start == 0 and (end is None or end >= size) and _arg(node, 4, "step", 1) == 1:
                    return self.set_packed(node, x.node, Layout(_shape(node), x.layout.axes))
                self.refuse("slices the sequence or batch axis")
            new = self.call(node.target, (x.node, self.packed_dim(x.layout, dim), *node.args[2:]), node.kwargs)
            return self.set_packed(node, new, Layout(_shape(node), x.layout.axes))
        index = node.args[2]
        if dim not in x.layout.axes:
            new = self.call(node.target, (x.node, self.packed_dim(x.layout, dim), index))
            axes = tuple(a - (dim < a) for a in x.layout.axes)
            return self.set_packed(node, new, Layout(_shape(node), axes))
        if len(x.layout.axes) != 2 or dim != x.layout.axes[1] or len(self.geo.tok_dims) != 1:
            self.refuse("selects along the batch or a flattened token axis")
        position = _norm_dim(index, self.geo.max_len)
        if position >= min(self.geo.lengths):
            self.refuse(f"reads position {position}, which is padding in some rows")
        # e.g. CLS pooling: position j of every sequence, read from the packed tokens.
        pieces = [self.call(aten.select.int, (x.node, 0, start + position)) for start in self.geo.starts]
        self._per_sequence(node, x, pieces, keepdim=False)

    def _split(self, node: torch.fx.Node) -> None:
        x = self.get_packed(node.args[0])
        rank = len(x.layout.shape)
        unbind = node.target is aten.unbind.int
        dim = _norm_dim(_arg(node, 1 if unbind else 2, "dim", 0), rank)
        mapped = self._map_dim(x.layout, dim, "splits along the token axes")
        args = [x.node] + list(node.args[1:])
        if unbind:
            args = [x.node, mapped]
        elif len(args) > 2:
            args[2] = mapped
        else:
            args.append(mapped)
        axes = tuple(a - (unbind and dim < a) for a in x.layout.axes)  # unbind drops the split axis
        layouts = [Layout(tuple(int(s) for s in v.shape), axes) for v in node.meta["val"]]
        self.set_packed(node, self.call(node.target, args), layouts)

    def _cat(self, node: torch.fx.Node) -> None:
        parts = node.args[0]
        rank = len(_shape(node))
        dim = _norm_dim(_arg(node, 1, "dim", 0), rank)
        axes = next(self.get_packed(p).layout.axes for p in parts if self.is_packed(p))
        out = Layout(_shape(node), axes)
        mapped = self._map_dim(out, dim, "concatenates along the token axes")
        new_parts = []
        for part in parts:
            if self.is_packed(part):
                packed = self.get_packed(part)
                if packed.layout.axes != axes:
                    self.refuse("concatenates values whose token axes differ")
                new_parts.append(packed.node)
            else:
                new_parts.append(self.broadcast_pack(part, Layout(_shape(part), axes)))
        self.set_packed(node, self.call(aten.cat.default, (new_parts, mapped)), out)

    def _attention(self, node: torch.fx.Node) -> None:
        q, k, v = (self.get_packed(a) if self.is_packed(a) else None for a in node.args[:3])
        if q is None or k is None or v is None:
            self.refuse("attends between token-indexed and other values (cross-attention)")
        for t in (q, k, v):
            if len(t.layout.shape) != 4 or t.layout.axes != (0, 2):
                self.refuse("has query/key/value not laid out as [batch, heads, sequence, dim]")
        if _arg(node, 4, "dropout_p", 0.0):
            self.refuse("applies attention dropout")
        pattern = self.patterns.get(node)
        if pattern is None:
            self.refuse("has an attention mask that was not analysed")
        kwargs = {k_: v_ for k_, v_ in node.kwargs.items() if k_ in ("scale", "enable_gqa")}
        out = Layout(_shape(node), q.layout.axes)
        if len(self.geo.tok_dims) == 2:
            # prepack: dense rows with a block-diagonal mask, as in the Prepacking paper.
            mask_name = "causal_block_mask" if pattern == "causal" else "full_block_mask"
            mask = self.const(mask_name, lambda: getattr(self.geo, mask_name))
            heads = [self.call(aten.permute.default, (t.node, [0, 2, 1, 3])) for t in (q, k, v)]
            att = self.call(aten.scaled_dot_product_attention.default, (*heads, mask), kwargs)
            self.attention_calls += 1
            return self.set_packed(node, self.call(aten.permute.default, (att, [0, 2, 1, 3])), out)
        results = []
        for start, count, length in self.geo.groups:
            # One SDPA per run of equal-length sequences: [count, heads, length, dim], no padding.
            def group(t: Packed) -> torch.fx.Node:
                value = t.node
                if (start, count * length) != (0, self.geo.slots):
                    value = self.call(aten.slice.Tensor, (value, 0, start, start + count * length))
                value = self.reshape(value, [count, length] + t.layout.rest)
                return self.call(aten.permute.default, (value, [0, 2, 1, 3]))

            att = self.call(aten.scaled_dot_product_attention.default, (group(q), group(k), group(v)),
                            {**kwargs, "is_causal": pattern == "causal" and length > 1})
            self.attention_calls += 1
            att = self.call(aten.permute.default, (att, [0, 2, 1, 3]))
            results.append(self.reshape(att, [count * length] + out.rest))
        new = results[0] if len(results) == 1 else self.call(aten.cat.default, (results, 0))
        self.set_packed(node, new, out)
