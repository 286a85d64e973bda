"""Making the planned token cuts (``cut.plan_cuts`` decided every one of them).

Per cut, in layer order: the attention becomes an explicit
softmax(QKᵀ·scale + mask)·V so its probabilities exist as a value; the cut's
selector emits the kept indices from them; every crossing value is gathered
(or averaged, or replaced by the merged sizes) right before the cut's start
and every reader after it reads the result. Then the view/reshape/expand
nodes after the cuts take their planned sizes and the metadata asserts that
name the old shapes go. Nothing here refuses: the plan has.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from tfcompile import structure
from tfcompile.graph import ModelGraph
from tfcompile.passes.tokens import merging
from tfcompile.passes.tokens.cut import Action, CutPlan

aten = torch.ops.aten


def explicit_attention(build: structure.GraphBuilder, attention: torch.fx.Node, head_dim: int,
                       mask_is_bool: bool) -> tuple[torch.fx.Node, torch.fx.Node]:
    """softmax(QKᵀ·scale + mask)·V with the probabilities as a value; returns (output, P)."""
    b = build
    q, k, v = attention.args[:3]
    mask = structure.dim_arg(attention, 3, "attn_mask")
    scale = attention.kwargs.get("scale") or (attention.args[6] if len(attention.args) > 6 else None)
    scores = b(aten.matmul.default, q, b(aten.transpose.int, k, -2, -1))
    scores = b(aten.mul.Tensor, scores, float(scale) if scale is not None else 1.0 / math.sqrt(head_dim))
    if isinstance(mask, torch.fx.Node):
        if mask_is_bool:
            # A large finite fill, not −inf: a fully masked row must not turn into NaN.
            scores = b(aten.masked_fill.Scalar, scores, b(aten.logical_not.default, mask),
                       torch.finfo(torch.float32).min)
        else:
            scores = b(aten.add.Tensor, scores, mask)
    probs = b(aten.softmax.int, scores, -1)
    return b(aten.matmul.default, probs, v), probs


def gather_tokens(build: structure.GraphBuilder, value: torch.fx.Node, shape: list[int], axes: tuple[int, ...],
                  idx: torch.fx.Node, flat_idx: torch.fx.Node, keep: int, batch: int) -> torch.fx.Node:
    """``value`` at the kept tokens along each of ``axes`` (per-row indices ``idx`` [B, keep])."""
    b = build
    shape = list(shape)
    if shape[0] != batch:
        value = b(aten.expand.default, value, [batch] + shape[1:])
        shape = [batch] + shape[1:]
    for axis in axes:
        if axis == 1:
            # Rows of [B·N, rest]: one index per token, not one per element as gather needs.
            rest = shape[2:]
            value = b(aten.reshape.default, value, [batch * shape[1]] + rest)
            value = b(aten.index_select.default, value, 0, flat_idx)
            value = b(aten.reshape.default, value, [batch, keep] + rest)
        else:
            view = [batch] + [1] * (len(shape) - 1)
            view[axis] = keep
            target = list(shape)
            target[axis] = keep
            index = b(aten.expand.default, b(aten.view.default, idx, view), target)
            value = b(aten.gather.default, value, axis, index)
        shape[axis] = keep
    return value


def apply_cuts(graph: ModelGraph, plan: CutPlan) -> None:
    """Make every cut of ``plan`` in ``graph`` (the graph it was planned on)."""
    g = graph.gm.graph
    build = structure.GraphBuilder(graph.gm)
    current: dict[torch.fx.Node, torch.fx.Node] = {}  # a crossing value -> what the last cut made of it
    sizes = plan.merge.sizes_from if plan.merge is not None else None
    for cut in plan.cuts:
        batch, _, n, head_dim = cut.shape
        keys = cut.attention.args[1]
        parts: dict = {}
        idx = None
        with g.inserting_before(cut.attention):
            out, probs = explicit_attention(build, cut.attention, head_dim, cut.mask_is_bool)
            if cut.selector.at_attention:
                idx = cut.selector.emit(build, keys, probs, cut.shape, cut.keep, parts)
        if idx is None:
            with g.inserting_before(cut.start):
                idx = cut.selector.emit(build, keys, probs, cut.shape, cut.keep, parts)
        cut.attention.replace_all_uses_with(out)
        g.erase_node(cut.attention)
        nodes = list(g.nodes)
        downstream = set(nodes[nodes.index(cut.start):])
        with g.inserting_before(cut.start):
            offsets = build.const("prune_row_offsets", (torch.arange(batch) * n).unsqueeze(1))
            flat_idx = build(aten.reshape.default, build(aten.add.Tensor, idx, offsets), [batch * cut.keep])
            merged = None
            if plan.merge is not None:
                if sizes is None:  # the first cut, and no earlier rewrite left sizes
                    sizes = parts["valid"]
                    for mask in plan.merge.pooling_masks:  # a token outside the pooling mask has no mass
                        sizes = build(aten.mul.Tensor, sizes, build(aten._to_copy.default, mask, dtype=torch.float32))
                merged = merging.merge_sizes(build, sizes, parts["unit"], parts.get("similarity"), idx, cut.shape,
                                             cut.keep)
                sizes = merged.weights
                if plan.merge.attention:
                    merging.unwrap_biases(g, downstream)
            for crossing in cut.crossings:
                value = current.get(crossing.value, crossing.value)
                if crossing.action is Action.SIZES:
                    new = merged.weights
                elif crossing.action is Action.AVERAGE:
                    new = merging.average_states(build, merged, value, crossing.shape[-1])
                else:
                    new = gather_tokens(build, value, list(crossing.shape), crossing.axes, idx, flat_idx, cut.keep,
                                        batch)
                for user in list(value.users):
                    if user in downstream:
                        user.replace_input_with(value, new)
                current[crossing.value] = new
            if plan.merge is not None and plan.merge.attention:
                later = {node: dtype for node, dtype in plan.merge.mask_dtypes if node in downstream}
                merging.proportional_attention(build, merged, later)
    for node, size in plan.resized:
        node.update_arg(1, list(size))
    for node in plan.asserts:
        g.erase_node(node)
    structure.remove_dead_code(graph.gm)
    graph.gm.recompile()
