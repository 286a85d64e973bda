"""The forms of a linear layer ``x·Wᵀ + b`` (in → out), each written once.

``structure_ffn`` emits them (``emit_*``) with real weights (``GraphBuilder(gm)``) and the
FFN cost model emits the same functions with sketch constants
(``GraphBuilder()``), so the form a pass writes is the form the cost model
prices:

- dense: ``linear(x, W, b)``;
- low-rank: ``linear(linear(x, V), U, b)``, V [r×in], U [out×r];
- block-dense: the input split into k chunks, ``blkdiag(V₁..V_k)`` applied
  as one batched GEMM (view → transpose → bmm → transpose → reshape, so ONNX
  and the cost model see a single bmm), then ``linear(·, U, b)``; V is
  [k, in/k, r/k], U [out×r].

``x`` has any leading axes (``lead``); they all count as tokens.
``sketch_of`` copies an existing sub-graph into a sketch, to price it
against one of these forms.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx

from tfcompile.structure.build import GraphBuilder
from tfcompile.structure.shapes import prod

aten = torch.ops.aten


def emit_dense_linear(build: GraphBuilder, x: torch.fx.Node, weight: torch.fx.Node, bias: torch.fx.Node | None, *,
                 lead: Sequence[int], d_out: int) -> torch.fx.Node:
    return build(aten.linear.default, x, weight, bias, shape=(*lead, d_out))


def emit_lowrank_linear(build: GraphBuilder, x: torch.fx.Node, v: torch.fx.Node, u: torch.fx.Node,
                   bias: torch.fx.Node | None, *, lead: Sequence[int], d_out: int, rank: int) -> torch.fx.Node:
    h = build(aten.linear.default, x, v, None, shape=(*lead, rank))
    return build(aten.linear.default, h, u, bias, shape=(*lead, d_out))


def emit_blockdense_linear(build: GraphBuilder, x: torch.fx.Node, v: torch.fx.Node, u: torch.fx.Node,
                      bias: torch.fx.Node | None, *, lead: Sequence[int], d_in: int, d_out: int, rank: int,
                      blocks: int) -> torch.fx.Node:
    tokens, k = prod(lead), blocks
    p, q = d_in // k, rank // k
    xb = build(aten.view.default, x, [tokens, k, p], shape=(tokens, k, p))
    xt = build(aten.transpose.int, xb, 0, 1, shape=(k, tokens, p))
    hb = build(aten.bmm.default, xt, v, shape=(k, tokens, q))
    ht = build(aten.transpose.int, hb, 0, 1, shape=(tokens, k, q))
    # reshape, not view: the transposed blocks are not contiguous.
    h = build(aten.reshape.default, ht, [*lead, rank], shape=(*lead, rank))
    return build(aten.linear.default, h, u, bias, shape=(*lead, d_out))


def sketch_of(nodes: Sequence[torch.fx.Node]) -> GraphBuilder:
    """A sketch holding copies of ``nodes``, which read stand-ins for the values they take from outside.

    Weights stay weights (get_attr) and other outside values become inputs,
    each with the original's value metadata, so a cost model prices the copy
    as it prices the nodes in place."""
    build = GraphBuilder()
    copies: dict[torch.fx.Node, torch.fx.Node] = {}

    def copy_of(node: torch.fx.Node) -> torch.fx.Node:
        if node not in copies:
            if node.op == "get_attr":
                stand_in = build.graph.get_attr(node.target)
            else:
                stand_in = build.graph.placeholder(node.name)
            stand_in.meta = dict(node.meta)
            copies[node] = stand_in
        return copies[node]

    for node in nodes:
        copies[node] = build.graph.node_copy(node, copy_of)
    return build
