"""The plan of a packed rewrite: which token-wise rule each op of the graph gets.

``plan_tokens`` walks the graph once, read-only, and gives every node a
``Step``: values that are not indexed by token (weights, the mask
construction, pooled sentence vectors) are copied unchanged; every op that
touches a token-indexed value gets the rule that re-expresses it on packed
tokens, with the layout of its packed result. A non-token value that meets a
packed one in a broadcasting op is gathered at the packed tokens' (b, j)
coordinates, which is how position and token-type embeddings travel with their
tokens.

Only ops with a rule here may touch a packed value; any other op refuses,
naming the node, so an unknown op never silently mixes tokens: a sequence
convolution, BatchNorm, cumulative sums, pooling over the sequence that reads
padded positions (an unmasked mean) and reshapes across the token axes are
refused. The only pooling kept is a sum of values that are zero at every
padded position (a mask-weighted sum), which equals the sum over each
sequence's own tokens.
"""

from __future__ import annotations

import dataclasses
import enum
import operator

import torch
import torch.fx

from tfcompile import structure
from tfcompile.graph import ModelGraph
from tfcompile.passes.base import PassRefused
from tfcompile.passes.padding.batch import PaddedBatch
from tfcompile.passes.padding.geometry import Geometry
from tfcompile.passes.padding.layout import (
    ELEMENTWISE_EXTRA, MATMULS, NORMS, PERMUTES, REDUCTIONS, RESHAPES, SOFTMAXES, SPLITS, VIEWS, ZERO_KEEPING,
    Layout, broadcast_shape, broadcasts_per_token, norm_dim, packed_dim, reshaped_layout, token_dims,
)

aten = torch.ops.aten

_MIXING_HINTS = {
    "convolution": "a sequence convolution mixes neighbouring tokens",
    "conv1d": "a sequence convolution mixes neighbouring tokens",
    "batch_norm": "BatchNorm mixes statistics across tokens",
    "cumsum": "a cumulative sum runs across tokens",
}


class Rule(enum.Enum):
    COPY = "copy"  # not token-indexed: copied unchanged
    SKIP = "skip"  # asserts the traced (padded) metadata of a token-indexed value, which packing changes
    OUTPUT = "output"  # token-indexed outputs are scattered back to [B, L, ...]
    GETITEM = "getitem"
    ATTENTION = "attention"  # per sequence: SDPA per length group, or block-diagonal rows
    RESHAPE = "reshape"
    PERMUTE = "permute"  # dims: the permutation of the packed value
    EXPAND = "expand"
    MATMUL = "matmul"  # dims: (index of the token-indexed operand,)
    EMBEDDING = "embedding"
    NORM = "norm"
    SOFTMAX = "softmax"  # dims: (packed axis,)
    REDUCE = "reduce"  # over non-token axes; dims: the packed axes
    POOL = "pool"  # a masked sum over each sequence's tokens; the result is not token-indexed
    SAME = "same"  # a slice that keeps a token axis whole: the packed value itself
    SLICE = "slice"  # along a non-token axis; dims: (packed axis,)
    SELECT = "select"  # along a non-token axis; dims: (packed axis,)
    SELECT_POSITION = "select_position"  # position dims[0] of every sequence (CLS pooling)
    SPLIT = "split"  # dims: (packed axis,)
    CAT = "cat"  # dims: (packed axis,)
    INDEX_SELECT = "index_select"  # dims: (packed axis,)
    ELEMENTWISE = "elementwise"


@dataclasses.dataclass(frozen=True)
class Step:
    rule: Rule
    layout: Layout | tuple[Layout, ...] | None = None  # the packed result's (a tuple for split); None if plain
    dims: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class TokenPlan:
    steps: dict[torch.fx.Node, Step]  # every node of the graph, in order
    token_inputs: frozenset[torch.fx.Node]
    patterns: dict[torch.fx.Node, str]  # attention node -> "full" or "causal" within a sequence
    attention_calls: int  # SDPA calls in the packed graph

    def layout_of(self, node: torch.fx.Node) -> Layout | tuple[Layout, ...]:
        step = self.steps.get(node)
        if step is not None and step.layout is not None:
            return step.layout
        return input_layout(node)


def input_layout(node: torch.fx.Node) -> Layout:
    """A token input's layout: [B, L, ...], gathered where it is first used."""
    return Layout(structure.shape_of(node), (0, 1))


@dataclasses.dataclass(frozen=True)
class PackingPlan:
    """What remove_padding and prepack rewrite: the batch, where its tokens go, and each op's rule."""

    batch: PaddedBatch
    geometry: Geometry
    tokens: TokenPlan
    varlen_attention: bool = False  # remove_padding: one variable-length attention per layer, not one per length


def plan_tokens(graph: ModelGraph, geometry: Geometry, batch: PaddedBatch) -> TokenPlan:
    """The rule of every node for ``geometry``; refuses (naming the node) when an op mixes tokens."""
    return _Planner(geometry, batch).plan(graph)


class _Planner:
    def __init__(self, geometry: Geometry, batch: PaddedBatch):
        self.geo = geometry
        self.seeds = frozenset(batch.inputs.tokens)
        self.patterns = batch.patterns
        self.zero_pad = dict(batch.zero_pad)  # node -> its (batch, sequence) axes, if zero at padding
        self.plain: set[torch.fx.Node] = set()
        self.layouts: dict[torch.fx.Node, Layout | tuple[Layout, ...]] = {}
        self.steps: dict[torch.fx.Node, Step] = {}
        self.cur: torch.fx.Node | None = None
        self.attention_calls = 0

    def plan(self, graph: ModelGraph) -> TokenPlan:
        for node in graph.gm.graph.nodes:
            self.cur = node
            self.steps[node] = self._step(node)
        return TokenPlan(self.steps, self.seeds, self.patterns, self.attention_calls)

    # -- state -----------------------------------------------------------------------------------
    def is_packed(self, node) -> bool:
        return isinstance(node, torch.fx.Node) and (node in self.layouts or node in self.seeds)

    def layout_of(self, node: torch.fx.Node) -> Layout | tuple[Layout, ...]:
        return self.layouts[node] if node in self.layouts else input_layout(node)

    def refuse(self, why: str):
        node = self.cur
        raise PassRefused(f"{node.name} ({getattr(node.target, '__name__', str(node.target))}) {why}")

    def _packed(self, node: torch.fx.Node, rule: Rule, layout, dims=()) -> Step:
        self.layouts[node] = layout
        if isinstance(layout, Layout):
            self._mark_zero_pad(node, layout.axes)
        return Step(rule, layout, tuple(dims))

    def _plain(self, node: torch.fx.Node, rule: Rule, dims=()) -> Step:
        self.plain.add(node)
        return Step(rule, None, tuple(dims))

    def _check_plain(self, arg) -> None:
        if isinstance(arg, torch.fx.Node) and self.is_packed(arg) and arg not in self.plain:
            self.refuse(f"takes the token-indexed {arg.name} as a parameter")

    def _map_dim(self, layout: Layout, dim: int, why: str) -> int:
        mapped = packed_dim(self.geo, layout, dim)
        if mapped is None:
            self.refuse(why)
        return mapped

    def _check_broadcast(self, node: torch.fx.Node, out: Layout) -> None:
        shape = structure.shape_of(node)
        if not broadcasts_per_token(self.geo, shape, out):
            self.refuse(f"broadcasts {node.name} of shape {list(broadcast_shape(shape, out))} "
                        "against the token axes")

    def _zero_axes(self, arg, rank: int) -> tuple[int, ...] | None:
        """The token axes, in a rank-``rank`` result, of ``arg`` if it is zero at padded positions."""
        if not isinstance(arg, torch.fx.Node) or arg not in self.zero_pad:
            return None
        return tuple(a + rank - len(structure.shape_of(arg)) for a in self.zero_pad[arg])

    def _mark_zero_pad(self, node: torch.fx.Node, axes: tuple[int, ...] | None = None) -> None:
        """Record whether ``node`` is zero at padded positions, and on which axes (b, j) lie.

        ``axes`` is the packed result's layout; for a plain value only casts,
        trailing unsqueezes and products keep track of where the zeros are."""
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return
        shape = structure.shape_of(node)
        rank = -1 if shape is None else len(shape)
        first = self._zero_axes(node.args[0], rank)
        target = node.target
        if target in ZERO_KEEPING or (axes is not None and target in VIEWS):
            found = first if axes is None else (axes if first is not None else None)
        elif target is aten.unsqueeze.default and axes is None:
            dim = norm_dim(node.args[1], rank)
            found = None if first is None else tuple(a - 1 + (a - 1 >= dim) for a in first)
        elif target is aten.mul.Tensor:
            found = first if first is not None else self._zero_axes(node.args[1], rank)
        elif target is aten.div.Tensor:
            found = first
        else:
            found = None
        if found is not None and (axes is None or found == axes):
            self.zero_pad[node] = found

    # -- the walk --------------------------------------------------------------------------------
    def _step(self, node: torch.fx.Node) -> Step:
        if node.op in ("placeholder", "get_attr"):
            return self._plain(node, Rule.COPY)
        if node.op == "output":
            return Step(Rule.OUTPUT)
        inputs = node.all_input_nodes
        if node.op == "call_function" and any(self.is_packed(a) for a in inputs) and not (
                node.target in structure.METADATA_OPS and all(a in self.plain for a in inputs)):
            try:
                return self._token_rule(node)
            except PassRefused:
                # A token input used where it cannot be packed (e.g. ids in a cumsum) is
                # computed padded, exactly as before; it is gathered again if it meets tokens.
                if not all(a in self.plain for a in inputs):
                    raise
        else:
            missing = [a for a in inputs if a not in self.plain]
            if missing:
                self.refuse(f"reads the token-indexed value {missing[0].name} as a whole")
        self._mark_zero_pad(node)
        return self._plain(node, Rule.COPY)

    def _token_rule(self, node: torch.fx.Node) -> Step:
        target = node.target
        shape = structure.shape_of(node)
        if target in structure.METADATA_OPS:
            return Step(Rule.SKIP)
        if target is operator.getitem:
            return self._packed(node, Rule.GETITEM, self.layout_of(node.args[0])[node.args[1]])
        if target is aten.scaled_dot_product_attention.default:
            return self._attention(node)
        if target in RESHAPES:
            x = self.layout_of(node.args[0])
            out = reshaped_layout(self.geo, x, shape)
            if out is None:
                self.refuse(f"reshapes {list(x.shape)} to {list(shape)} across the token axes")
            return self._packed(node, Rule.RESHAPE, out)
        if target in PERMUTES:
            return self._permute(node)
        if target is aten.expand.default:
            x = self.layout_of(node.args[0])
            lead = len(shape) - len(x.shape)
            out = Layout(shape, tuple(a + lead for a in x.axes))
            if any(shape[a] != x.shape[a - lead] for a in out.axes):
                self.refuse("broadcasts along the token axes")
            return self._packed(node, Rule.EXPAND, out)
        if target in MATMULS:
            return self._matmul(node)
        if target is aten.embedding.default:
            indices = self.layout_of(node.args[1])
            if self.is_packed(node.args[0]):
                self.refuse("looks up a token-indexed table")
            return self._packed(node, Rule.EMBEDDING, Layout(shape, indices.axes))
        if target in NORMS:
            x = self.layout_of(node.args[0])
            if max(x.axes) >= len(x.shape) - len(node.args[1]):
                self.refuse("normalises over the token axes")
            for arg in node.args[1:]:
                self._check_plain(arg)
            return self._packed(node, Rule.NORM, Layout(shape, x.axes))
        if target in SOFTMAXES:
            x = self.layout_of(node.args[0])
            dim = self._map_dim(x, node.args[1], "normalises over the sequence")
            return self._packed(node, Rule.SOFTMAX, x, (dim,))
        if target in REDUCTIONS:
            return self._reduce(node)
        if target in (aten.slice.Tensor, aten.select.int):
            return self._slice(node)
        if target in SPLITS:
            return self._split(node)
        if target is aten.cat.default:
            return self._cat(node)
        if target is aten.index_select.default:
            x = self.layout_of(node.args[0])
            dim = self._map_dim(x, node.args[1], "indexes along the sequence")
            self._check_plain(node.args[2])
            return self._packed(node, Rule.INDEX_SELECT, Layout(shape, x.axes), (dim,))
        if target in ELEMENTWISE_EXTRA or (hasattr(target, "tags") and torch.Tag.pointwise in target.tags):
            if target is aten.dropout.default and structure.dim_arg(node, 2, "train", False):
                self.refuse("is dropout in training mode")
            return self._elementwise(node)
        name = getattr(target, "__name__", str(target))
        hint = next((h for key, h in _MIXING_HINTS.items() if key in name), None)
        self.refuse(f"{hint or 'has no token-wise rule'}: padding removal needs every op except "
                    "attention (and masked pooling) to act on each token alone")

    # -- per-op rules ----------------------------------------------------------------------------
    def _elementwise(self, node: torch.fx.Node) -> Step:
        shape = structure.shape_of(node)
        axes = None
        for arg in node.all_input_nodes:
            if self.is_packed(arg):
                layout = self.layout_of(arg)
                shifted = tuple(a + len(shape) - len(layout.shape) for a in layout.axes)
                if axes is not None and shifted != axes:
                    self.refuse("combines values whose token axes do not line up")
                axes = shifted
        out = Layout(shape, axes)
        for arg in node.all_input_nodes:
            if not self.is_packed(arg):
                self._check_broadcast(arg, out)
        return self._packed(node, Rule.ELEMENTWISE, out)

    def _permute(self, node: torch.fx.Node) -> Step:
        x = self.layout_of(node.args[0])
        rank = len(x.shape)
        if node.target is aten.permute.default:
            perm = [norm_dim(d, rank) for d in node.args[1]]
        else:
            perm = list(range(rank))
            if node.target is aten.transpose.int:
                a, c = norm_dim(node.args[1], rank), norm_dim(node.args[2], rank)
            else:
                a, c = (0, 1) if rank == 2 else (0, 0)  # aten.t
            perm[a], perm[c] = perm[c], perm[a]
        out = Layout(structure.shape_of(node), tuple(perm.index(a) for a in x.axes))
        ntok = len(token_dims(self.geo, x))
        inner = list(range(ntok)) + [ntok + x.rest_axes.index(perm[i]) for i in out.rest_axes]
        return self._packed(node, Rule.PERMUTE, out, inner)

    def _matmul(self, node: torch.fx.Node) -> Step:
        x_index = 1 if node.target is aten.addmm.default else 0
        x = self.layout_of(node.args[x_index])
        others = [a for i, a in enumerate(node.args) if i != x_index]
        if any(self.is_packed(a) for a in others if isinstance(a, torch.fx.Node)):
            self.refuse("multiplies two token-indexed values (only attention may)")
        if len(x.shape) - 1 in x.axes:
            self.refuse("contracts over the token axes")
        if node.target in (aten.mm.default, aten.matmul.default) and len(structure.shape_of(node.args[1])) > 2:
            self.refuse("is a batched matmul over token-indexed operands")
        return self._packed(node, Rule.MATMUL, Layout(structure.shape_of(node), x.axes), (x_index,))

    def _reduce(self, node: torch.fx.Node) -> Step:
        x = self.layout_of(node.args[0])
        rank = len(x.shape)
        dim_index, keep_index = REDUCTIONS[node.target]
        dims = structure.dim_arg(node, dim_index, "dim")
        keepdim = bool(structure.dim_arg(node, keep_index, "keepdim", False))
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            self.refuse("reduces over every axis, tokens included")
        dims = [norm_dim(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if any(d in x.axes for d in dims):
            return self._pool(node, x, dims)
        mapped = [packed_dim(self.geo, x, d) for d in dims]
        axes = x.axes if keepdim else tuple(a - sum(d < a for d in dims) for a in x.axes)
        return self._packed(node, Rule.REDUCE, Layout(structure.shape_of(node), axes), mapped)

    def _pool(self, node: torch.fx.Node, x: Layout, dims: list[int]) -> Step:
        if len(x.axes) != 2 or self.geo.binned:
            self.refuse("pools over flattened or binned tokens")
        if dims != [x.axes[1]]:
            self.refuse("reduces over the batch axis")
        if node.target is not aten.sum.dim_IntList or structure.dim_arg(node, 3, "dtype") is not None:
            self.refuse("pools over the sequence including padded positions (only a sum of "
                        "mask-weighted values ignores them)")
        if self._zero_axes(node.args[0], len(x.shape)) != x.axes:
            self.refuse("sums over the sequence and padded positions are not masked to zero "
                        "before it (pooling before unpacking)")
        # Padded positions hold exact zeros in the original sum, so summing each
        # sequence's own tokens gives the same value up to summation order.
        return self._plain(node, Rule.POOL)

    def _slice(self, node: torch.fx.Node) -> Step:
        x = self.layout_of(node.args[0])
        shape = structure.shape_of(node)
        dim = norm_dim(structure.dim_arg(node, 1, "dim", 0), len(x.shape))
        if node.target is aten.slice.Tensor:
            if dim in x.axes:
                start, end = structure.dim_arg(node, 2, "start") or 0, structure.dim_arg(node, 3, "end")
                whole = start == 0 and (end is None or end >= x.shape[dim])
                if whole and structure.dim_arg(node, 4, "step", 1) == 1:
                    return self._packed(node, Rule.SAME, Layout(shape, x.axes))
                self.refuse("slices the sequence or batch axis")
            return self._packed(node, Rule.SLICE, Layout(shape, x.axes), (packed_dim(self.geo, x, dim),))
        if dim not in x.axes:
            axes = tuple(a - (dim < a) for a in x.axes)
            return self._packed(node, Rule.SELECT, Layout(shape, axes), (packed_dim(self.geo, x, dim),))
        if len(x.axes) != 2 or dim != x.axes[1] or self.geo.binned:
            self.refuse("selects along the batch or a flattened token axis")
        position = norm_dim(node.args[2], self.geo.max_len)
        if position >= min(self.geo.lengths):
            self.refuse(f"reads position {position}, which is padding in some rows")
        return self._plain(node, Rule.SELECT_POSITION, (position,))

    def _split(self, node: torch.fx.Node) -> Step:
        x = self.layout_of(node.args[0])
        unbind = node.target is aten.unbind.int
        dim = norm_dim(structure.dim_arg(node, 1 if unbind else 2, "dim", 0), len(x.shape))
        mapped = self._map_dim(x, dim, "splits along the token axes")
        axes = tuple(a - (unbind and dim < a) for a in x.axes)  # unbind drops the split axis
        layouts = tuple(Layout(tuple(int(s) for s in v.shape), axes) for v in node.meta["val"])
        return self._packed(node, Rule.SPLIT, layouts, (mapped,))

    def _cat(self, node: torch.fx.Node) -> Step:
        parts = node.args[0]
        shape = structure.shape_of(node)
        dim = norm_dim(structure.dim_arg(node, 1, "dim", 0), len(shape))
        axes = next(self.layout_of(p).axes for p in parts if self.is_packed(p))
        out = Layout(shape, axes)
        mapped = self._map_dim(out, dim, "concatenates along the token axes")
        for part in parts:
            if not self.is_packed(part):
                self._check_broadcast(part, Layout(structure.shape_of(part), axes))
            elif self.layout_of(part).axes != axes:
                self.refuse("concatenates values whose token axes differ")
        return self._packed(node, Rule.CAT, out, (mapped,))

    def _attention(self, node: torch.fx.Node) -> Step:
        q, k, v = (self.layout_of(a) if self.is_packed(a) else None for a in node.args[:3])
        if q is None or k is None or v is None:
            self.refuse("attends between token-indexed and other values (cross-attention)")
        for t in (q, k, v):
            if len(t.shape) != 4 or t.axes != (0, 2):
                self.refuse("has query/key/value not laid out as [batch, heads, sequence, dim]")
        if structure.dim_arg(node, 4, "dropout_p", 0.0):
            self.refuse("applies attention dropout")
        if node not in self.patterns:
            self.refuse("has an attention mask that was not analysed")
        self.attention_calls += self.geo.calls_per_attention
        return self._packed(node, Rule.ATTENTION, Layout(structure.shape_of(node), q.axes))
