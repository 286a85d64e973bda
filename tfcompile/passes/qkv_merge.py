"""Merge sibling projections that read the same tensor into one GEMM.

Rewrites ``linear(x, Wq, bq), linear(x, Wk, bk), linear(x, Wv, bv)`` (any
group of two or more linears reading the same ``x``, e.g. BERT/ViT/Llama q/k/v
or Llama's gate/up) into ``linear(x, cat(W), cat(b))`` followed by a split.

Preconditions: the linears read the very same node, their weights are model
attributes of one dtype, and either all or none have a bias.

Exact: each output element is the same dot product of the same row of W with
x; only the GEMM's blocking, hence float summation order, may differ.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch

from tfcompile import structure
from tfcompile.graph import ModelGraph
from tfcompile.passes.base import Exactness, PassResult, Stage, found_or_refuse, register_pass
from tfcompile.passes.context import PassContext

aten = torch.ops.aten


def _plan(graph: ModelGraph, context: PassContext) -> list[list[structure.LinearSite]]:
    by_input: dict[torch.fx.Node, list[structure.LinearSite]] = defaultdict(list)
    for site in structure.linear_sites(graph):
        by_input[site.input].append(site)
    groups = []
    for sites in by_input.values():
        if len(sites) < 2:
            continue
        if len({s.bias_target is None for s in sites}) != 1:
            continue
        if len({s.weight(graph).dtype for s in sites}) != 1:
            continue
        if len({s.weight(graph).shape[1] for s in sites}) != 1:
            continue
        groups.append(sites)
    return found_or_refuse(groups,
                           "no two linear layers read the same tensor (projections are already fused or absent)")


@register_pass("merge_qkv_projections", Exactness.EXACT,
               "fuse linears that read the same input (q/k/v, gate/up) into one GEMM",
               plan=_plan, stage=Stage.PROJECTIONS)
def merge_qkv_projections(graph: ModelGraph, groups: list[list[structure.LinearSite]]) -> PassResult:
    gm = graph.gm
    for sites in groups:
        # Insert after the last of the group so every operand is defined.
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        sites = sorted(sites, key=lambda s: order[s.node])
        first = sites[0].node
        weight = torch.cat([s.weight(graph) for s in sites], dim=0)
        weight_attr = structure.add_constant(gm, f"merged_{first.name}_weight", weight)
        bias_attr = None
        if sites[0].bias_target is not None:
            bias = torch.cat([s.bias(graph) for s in sites], dim=0)
            bias_attr = structure.add_constant(gm, f"merged_{first.name}_bias", bias)
        sizes = [s.weight(graph).shape[0] for s in sites]
        with gm.graph.inserting_before(first):
            w_node = gm.graph.get_attr(weight_attr)
            b_node = gm.graph.get_attr(bias_attr) if bias_attr else None
            fused = gm.graph.call_function(aten.linear.default, (sites[0].input, w_node, b_node))
            fused.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
            parts = gm.graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
            for i, site in enumerate(sites):
                part = gm.graph.call_function(operator.getitem, (parts, i))
                part.meta["nn_module_stack"] = site.node.meta.get("nn_module_stack", {})
                site.node.replace_all_uses_with(part)
        for site in sites:
            gm.graph.erase_node(site.node)
    gm.graph.eliminate_dead_code()
    merged = sum(len(s) for s in groups)
    return PassResult(graph, bool(groups), f"merged {merged} projections into {len(groups)} GEMMs")

