"""Builds the packed graph by following a ``TokenPlan``: the plan decided every rule, this only emits.

Each token-indexed value is held as a ``Packed`` node with the layout the plan
gave it; token inputs (ids) are gathered where they are first used, so unused
inputs cost nothing, and token-indexed outputs are scattered back to
[B, L, ...] with zeros at padded positions, so the variant keeps the original
signature. Constants (gather/scatter indices, prepack's block masks) are new
attributes named ``packing_*``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Callable

import torch
import torch.fx
from torch.fx.node import map_arg

from tfcompile import structure
from tfcompile.graph import ModelGraph, refresh_shapes
from tfcompile.passes.padding.geometry import Geometry
from tfcompile.passes.padding.layout import (
    REDUCTIONS, Layout, broadcast_shape, packed_shape, padded_token_sizes, token_dims,
)
from tfcompile.passes.padding.token_rules import PackingPlan, Rule, Step, TokenPlan, input_layout
from tfcompile.structure.varlen import SUM_SQ_LENGTHS, VARLEN_ATTENTION

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Packed:
    node: torch.fx.Node
    layout: Layout | tuple[Layout, ...]  # a tuple for the outputs of split / chunk / unbind


def pack(graph: ModelGraph, plan: PackingPlan) -> None:
    """Replace ``graph``'s FX graph by its packed form, guarded to the lengths it was packed for."""
    new = Packer(graph, plan.geometry, plan.tokens, varlen_attention=plan.varlen_attention).build()
    graph.gm.graph = new
    # The mask construction that attention no longer reads goes away here, its metadata asserts with it.
    structure.remove_dead_code(graph.gm)
    guard_traced_lengths(graph, plan.batch.inputs.masks, plan.batch.lengths)


def guard_traced_lengths(graph: ModelGraph, masks: list[torch.fx.Node], lengths: tuple[int, ...]) -> None:
    """Floating outputs become NaN when a mask input's valid tokens are not the packed ``lengths``.

    The packed graph's gathers and scatters are constants for those lengths: fed another batch it
    would return plausible rows for tokens it never computed (cosine 0.52-0.88 against the plain
    model, issue 23). ONNX has no assertion op, so the check poisons the outputs instead of
    letting them pass for right; at the lengths it was built for, every output is as before.
    """
    gm = graph.gm
    placeholders = {node.name: node for node in graph.nodes("placeholder")}  # the packed graph's own nodes
    masks = [placeholders[m.name] for m in masks if m.name in placeholders]
    if not masks:
        return  # the lengths came from the workload alone: the model has no input to check them against
    gm.recompile()
    refresh_shapes(graph)  # the packed outputs' dtypes decide which ones carry the check
    output = next(iter(reversed(gm.graph.nodes)))
    seq = masks[0].meta["val"].shape[1]
    expected = structure.valid_mask(lengths, seq)
    with gm.graph.inserting_before(output):
        expected_node = gm.graph.get_attr(structure.add_constant(gm, "packing_valid_tokens", expected))
        nan = gm.graph.get_attr(structure.add_constant(gm, "packing_nan", torch.tensor(float("nan"))))
        same = None
        for mask in masks:
            valid = gm.graph.call_function(aten.ne.Scalar, (mask, 0))
            agrees = gm.graph.call_function(aten.all.default, (gm.graph.call_function(aten.eq.Tensor,
                                                                                     (valid, expected_node)),))
            same = agrees if same is None else gm.graph.call_function(aten.logical_and.default, (same, agrees))

    def poisoned(value):
        val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
        if not (isinstance(val, torch.Tensor) and val.is_floating_point()):
            return value
        with gm.graph.inserting_before(output):
            return gm.graph.call_function(aten.where.self, (same, value, nan))

    output.args = (map_arg(output.args[0], poisoned),)


class Packer:
    """Emits the packed graph; a subclass (the run-time form) overrides rules and extends ``emit``."""

    emit: dict[Rule, Callable[[Packer, torch.fx.Node, Step], None]] = {}  # filled below the class

    def __init__(self, graph: ModelGraph, geometry: Geometry, tokens: TokenPlan, varlen_attention: bool = False):
        self.gm = graph.gm
        self.varlen_attention = varlen_attention
        self.src = graph.gm.graph
        self.geo = geometry
        self.tokens = tokens
        self.new = torch.fx.Graph()
        self.new.set_codegen(self.src._codegen)
        self.plain: dict[torch.fx.Node, torch.fx.Node] = {}
        self.packed: dict[torch.fx.Node, Packed] = {}
        self.consts: dict[str, torch.fx.Node] = {}
        self.cur: torch.fx.Node | None = None

    def build(self) -> torch.fx.Graph:
        for node in self.src.nodes:
            self.cur = node
            step = self.tokens.steps[node]
            if step.rule is Rule.COPY:
                self.plain[node] = self.new.node_copy(node, self.plain.__getitem__)
            elif step.rule is Rule.OUTPUT:
                self.new.node_copy(node, self._output_arg)
            elif step.rule is not Rule.SKIP:
                self.emit[step.rule](self, node, step)
        return self.new

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

    def index(self, key: str) -> torch.fx.Node:
        """The geometry's token index ``key`` (gather_index, scatter_index, slot_batch, slot_position)."""
        return self.const(key, getattr(self.geo, key))

    def reshape(self, node: torch.fx.Node, shape: list[int], current: list[int] | None = None) -> torch.fx.Node:
        if current is not None and list(current) == list(shape):
            return node
        return self.call(aten.reshape.default, (node, list(shape)))

    def tok(self, layout: Layout) -> list[int]:
        return token_dims(self.geo, layout)

    def packed_shape(self, layout: Layout) -> list[int]:
        return packed_shape(self.geo, layout)

    def is_packed(self, node) -> bool:
        return isinstance(node, torch.fx.Node) and (node in self.packed or node in self.tokens.token_inputs)

    def get_packed(self, node: torch.fx.Node) -> Packed:
        if node not in self.packed:
            layout = input_layout(node)
            shape = layout.shape
            flat = self.reshape(self.plain[node], [shape[0] * shape[1]] + list(shape[2:]))
            index = self.index("gather_index")
            picked = self.call(aten.index_select.default, (flat, 0, index))
            self.packed[node] = Packed(self.reshape(picked, self.packed_shape(layout),
                                                    [self.geo.slots] + list(shape[2:])), layout)
        return self.packed[node]

    def set_packed(self, node: torch.fx.Node, new: torch.fx.Node, step: Step) -> None:
        self.packed[node] = Packed(new, step.layout)

    def plain_arg(self, arg):
        if isinstance(arg, torch.fx.Node):
            return self.plain[arg]
        return map_arg(arg, lambda a: self.plain[a]) if isinstance(arg, (list, tuple)) else arg

    def _output_arg(self, node: torch.fx.Node) -> torch.fx.Node:
        if node in self.plain:
            return self.plain[node]
        return self.unpack(self.packed[node])

    def unpack(self, packed: Packed) -> torch.fx.Node:
        """Scatter back to the original layout, zeros at padded positions."""
        layout = packed.layout
        rest = layout.rest
        flat = self.reshape(packed.node, [self.geo.slots] + rest, self.packed_shape(layout))
        zero = self.call(aten.new_zeros.default, (flat, [1] + rest))
        extended = self.call(aten.cat.default, ([flat, zero], 0))
        index = self.index("scatter_index")
        full = self.call(aten.index_select.default, (extended, 0, index))
        shaped = self.reshape(full, padded_token_sizes(self.geo, layout) + rest)
        order = list(layout.axes) + layout.rest_axes
        perm = [order.index(i) for i in range(len(layout.shape))]
        if perm != list(range(len(perm))):
            shaped = self.call(aten.permute.default, (shaped, perm))
        return shaped

    def broadcast_pack(self, node: torch.fx.Node, out: Layout) -> torch.fx.Node:
        """A non-token value that broadcasts against the token layout ``out`` (the plan checked it), packed."""
        value = self.plain[node]
        shape = broadcast_shape(structure.shape_of(node), out)
        if len(shape) != len(structure.shape_of(node)):
            value = self.reshape(value, list(shape))
        sizes = [shape[a] for a in out.axes]
        rest_shape = [shape[i] for i in out.rest_axes]
        if all(s == 1 for s in sizes):
            # Constant over the tokens: drop those axes and let broadcasting do the rest.
            return self.reshape(value, rest_shape)
        keep = [a for a, s in zip(out.axes, sizes) if s != 1]
        drop = [a for a, s in zip(out.axes, sizes) if s == 1]
        perm = keep + out.rest_axes + drop
        if perm != list(range(len(shape))):
            value = self.call(aten.permute.default, (value, perm))
        value = self.reshape(value, [math.prod(shape[a] for a in keep)] + rest_shape)
        if len(out.axes) == 1 or len(keep) == 2:
            index = self.index("gather_index")
        elif keep[0] == out.axes[0]:
            index = self.index("slot_batch")
        else:
            index = self.index("slot_position")
        picked = self.call(aten.index_select.default, (value, 0, index))
        return self.reshape(picked, self.tok(out) + rest_shape, [self.geo.slots] + rest_shape)

    def per_sequence(self, node: torch.fx.Node, x: Packed, pieces: list[torch.fx.Node], keepdim: bool) -> None:
        """Stack one [rest] piece per sequence into the original (non-token) result."""
        self.place_per_sequence(node, x, self.call(aten.stack.default, (pieces, 0)), keepdim)

    def place_per_sequence(self, node: torch.fx.Node, x: Packed, stacked: torch.fx.Node, keepdim: bool) -> None:
        """``stacked``, one [rest] row per sequence ([B] + rest), laid out as the original (non-token) result."""
        b_axis, l_axis = x.layout.axes
        kept = [i for i in range(len(x.layout.shape)) if i != l_axis]
        order = [b_axis] + x.layout.rest_axes  # original axis held by each stacked axis
        perm = [order.index(i) for i in kept]
        if perm != list(range(len(perm))):
            stacked = self.call(aten.permute.default, (stacked, perm))
        if keepdim:
            stacked = self.call(aten.unsqueeze.default, (stacked, l_axis))
        self.plain[node] = stacked

    # -- per-rule emission -----------------------------------------------------------------------
    def getitem(self, node: torch.fx.Node, step: Step) -> None:
        source = self.get_packed(node.args[0])
        self.set_packed(node, self.call(operator.getitem, (source.node, node.args[1])), step)

    def reshape_rule(self, node: torch.fx.Node, step: Step) -> None:
        x = self.get_packed(node.args[0])
        self.set_packed(node, self.reshape(x.node, self.packed_shape(step.layout), self.packed_shape(x.layout)), step)

    def permute(self, node: torch.fx.Node, step: Step) -> None:
        x = self.get_packed(node.args[0])
        inner = list(step.dims)
        new = x.node if inner == list(range(len(inner))) else self.call(aten.permute.default, (x.node, inner))
        self.set_packed(node, new, step)

    def expand(self, node: torch.fx.Node, step: Step) -> None:
        x = self.get_packed(node.args[0])
        lead = len(step.layout.shape) - len(x.layout.shape)
        value = self.reshape(x.node, self.tok(x.layout) + [1] * lead + x.layout.rest, self.packed_shape(x.layout))
        self.set_packed(node, self.call(aten.expand.default, (value, self.packed_shape(step.layout))), step)

    def matmul(self, node: torch.fx.Node, step: Step) -> None:
        (x_index,) = step.dims
        x = self.get_packed(node.args[x_index])
        args = [x.node if i == x_index else self.plain_arg(a) for i, a in enumerate(node.args)]
        self.set_packed(node, self.call(node.target, args, node.kwargs), step)

    def embedding(self, node: torch.fx.Node, step: Step) -> None:
        indices = self.get_packed(node.args[1])
        new = self.call(node.target, (self.plain[node.args[0]], indices.node, *node.args[2:]), node.kwargs)
        self.set_packed(node, new, step)

    def norm(self, node: torch.fx.Node, step: Step) -> None:
        x = self.get_packed(node.args[0])
        args = [x.node] + [self.plain_arg(a) for a in node.args[1:]]
        self.set_packed(node, self.call(node.target, args, node.kwargs), step)

    def with_packed_dim(self, node: torch.fx.Node, step: Step) -> None:
        """softmax / slice / select / index_select: the op itself, on the packed axis the plan mapped."""
        x = self.get_packed(node.args[0])
        rest = [self.plain_arg(a) for a in node.args[2:]]
        self.set_packed(node, self.call(node.target, (x.node, step.dims[0], *rest), node.kwargs), step)

    def reduce(self, node: torch.fx.Node, step: Step) -> None:
        x = self.get_packed(node.args[0])
        dim_index, _ = REDUCTIONS[node.target]
        args, kwargs = list(node.args), dict(node.kwargs)
        if len(args) > dim_index:
            args[dim_index] = list(step.dims)
        else:
            kwargs["dim"] = list(step.dims)
        args[0] = x.node
        self.set_packed(node, self.call(node.target, args, kwargs), step)

    def pool(self, node: torch.fx.Node, step: Step) -> None:
        x = self.get_packed(node.args[0])
        keepdim = bool(structure.dim_arg(node, REDUCTIONS[node.target][1], "keepdim", False))
        pieces = []
        for start, length in zip(self.geo.starts, self.geo.lengths):
            piece = self.call(aten.slice.Tensor, (x.node, 0, start, start + length))
            pieces.append(self.call(aten.sum.dim_IntList, (piece, [0])))
        self.per_sequence(node, x, pieces, keepdim)

    def same(self, node: torch.fx.Node, step: Step) -> None:
        self.set_packed(node, self.get_packed(node.args[0]).node, step)

    def select_position(self, node: torch.fx.Node, step: Step) -> None:
        x = self.get_packed(node.args[0])
        (position,) = step.dims
        pieces = [self.call(aten.select.int, (x.node, 0, start + position)) for start in self.geo.starts]
        self.per_sequence(node, x, pieces, keepdim=False)

    def split(self, node: torch.fx.Node, step: Step) -> None:
        x = self.get_packed(node.args[0])
        (mapped,) = step.dims
        if node.target is aten.unbind.int:
            args = [x.node, mapped]
        else:
            args = [x.node] + list(node.args[1:])
            if len(args) > 2:
                args[2] = mapped
            else:
                args.append(mapped)
        self.set_packed(node, self.call(node.target, args), step)

    def cat(self, node: torch.fx.Node, step: Step) -> None:
        parts = []
        for part in node.args[0]:
            if self.is_packed(part):
                parts.append(self.get_packed(part).node)
            else:
                parts.append(self.broadcast_pack(part, Layout(structure.shape_of(part), step.layout.axes)))
        self.set_packed(node, self.call(aten.cat.default, (parts, step.dims[0])), step)

    def elementwise(self, node: torch.fx.Node, step: Step) -> None:
        out = step.layout

        def convert(arg: torch.fx.Node) -> torch.fx.Node:
            if not self.is_packed(arg):
                return self.broadcast_pack(arg, out)
            packed = self.get_packed(arg)
            missing = len(out.rest) - len(packed.layout.rest)
            if missing:
                return self.reshape(packed.node, self.tok(out) + [1] * missing + packed.layout.rest)
            return packed.node

        self.set_packed(node, self.call(node.target, map_arg(node.args, convert), map_arg(node.kwargs, convert)),
                        step)

    def attention(self, node: torch.fx.Node, step: Step) -> None:
        q, k, v = (self.get_packed(a) for a in node.args[:3])
        causal = self.tokens.patterns[node] == "causal"
        kwargs = {k_: v_ for k_, v_ in node.kwargs.items() if k_ in ("scale", "enable_gqa")}
        out = step.layout
        if self.geo.binned:
            # prepack: dense rows with a block-diagonal mask, as in the Prepacking paper.
            mask_name = "causal_block_mask" if causal else "full_block_mask"
            mask = self.const(mask_name, lambda: getattr(self.geo, mask_name))
            heads = [self.call(aten.permute.default, (t.node, [0, 2, 1, 3])) for t in (q, k, v)]
            att = self.call(aten.scaled_dot_product_attention.default, (*heads, mask), kwargs)
            return self.set_packed(node, self.call(aten.permute.default, (att, [0, 2, 1, 3])), step)
        if self.varlen_attention:
            return self.set_packed(node, self.varlen(node, q.node, k.node, v.node, causal), step)
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
                            {**kwargs, "is_causal": causal and length > 1})
            att = self.call(aten.permute.default, (att, [0, 2, 1, 3]))
            results.append(self.reshape(att, [count * length] + out.rest))
        new = results[0] if len(results) == 1 else self.call(aten.cat.default, (results, 0))
        self.set_packed(node, new, step)


    def varlen(self, node: torch.fx.Node, q: torch.fx.Node, k: torch.fx.Node, v: torch.fx.Node,
               causal: bool) -> torch.fx.Node:
        """One ``tfcompile::varlen_attention`` over the packed [T, heads, dim] q, k, v, for attention ``node``."""
        query, key = (structure.tensor_meta(a) for a in node.args[:2])  # the padded [B, heads, L, dim]
        query_heads, head_dim, key_heads = query.shape[1], query.shape[-1], key.shape[1]
        if key_heads != query_heads:  # grouped-query attention: the reference loop and ONNX form need equal heads
            k, v = (self.call(aten.repeat_interleave.self_int, (t, query_heads // key_heads, 1)) for t in (k, v))
        scale = node.kwargs.get("scale")
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        offsets, max_len, sum_sq_lengths = self.varlen_bounds()
        att = self.call(VARLEN_ATTENTION, (q, k, v, offsets, max_len, causal, scale))
        att.meta[SUM_SQ_LENGTHS] = sum_sq_lengths
        return att

    def varlen_bounds(self) -> tuple[torch.fx.Node, int, float]:
        """The sequences' [B + 1] int64 offsets into the packed tokens, their longest length, and Σ l²."""
        def offsets():
            ends = [start + i * length for start, count, length in self.geo.groups for i in range(1, count + 1)]
            return torch.tensor([0, *ends], dtype=torch.int64)
        sum_sq = float(sum(count * length * length for _, count, length in self.geo.groups))
        return self.const("varlen_offsets", offsets), max(self.geo.lengths), sum_sq


Packer.emit = {
    Rule.GETITEM: Packer.getitem,
    Rule.ATTENTION: Packer.attention,
    Rule.RESHAPE: Packer.reshape_rule,
    Rule.PERMUTE: Packer.permute,
    Rule.EXPAND: Packer.expand,
    Rule.MATMUL: Packer.matmul,
    Rule.EMBEDDING: Packer.embedding,
    Rule.NORM: Packer.norm,
    Rule.SOFTMAX: Packer.with_packed_dim,
    Rule.REDUCE: Packer.reduce,
    Rule.POOL: Packer.pool,
    Rule.SAME: Packer.same,
    Rule.SLICE: Packer.with_packed_dim,
    Rule.SELECT: Packer.with_packed_dim,
    Rule.SELECT_POSITION: Packer.select_position,
    Rule.SPLIT: Packer.split,
    Rule.CAT: Packer.cat,
    Rule.INDEX_SELECT: Packer.with_packed_dim,
    Rule.ELEMENTWISE: Packer.elementwise,
}
