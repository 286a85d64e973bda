"""Clean-up passes: identity removal, dead-code elimination, constant folding.

- ``remove_identity_ops`` drops ops that return their input at inference time
  (eval-mode dropout, ``alias``, no-op ``to``/``clone``, metadata asserts).
- ``eliminate_dead_code`` removes nodes whose results nobody reads.
- ``fold_constants`` evaluates every subgraph that does not depend on input
  values (weight transposes, causal masks built from ``arange``, position ids)
  once and stores the result as a buffer. With static shapes, ops that read only
  an input's shape count as constant. Folding a large expansion is skipped
  (see MAX_FOLD_GROWTH) because it trades a cheap op for DRAM traffic.

All three are exact: the same ops run on the same values, ahead of time.
"""

from __future__ import annotations

import torch
import torch.fx

from tfcompile import structure
from tfcompile.graph import ModelGraph
from tfcompile.passes.base import Exactness, PassRefused, PassResult, Stage, found_or_refuse, register_pass
from tfcompile.passes.context import PassContext

aten = torch.ops.aten

IMPURE_NOOPS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}

# A folded result may be at most this many times larger than the constants it
# reads (plus a small absolute allowance), else the op stays in the graph.
MAX_FOLD_GROWTH = 4
FOLD_ALLOWANCE_BYTES = 1 << 20


def _is_identity(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is aten.dropout.default:
        return node.args[2] is False if len(node.args) > 2 else not node.kwargs.get("train", False)
    if node.target in (aten.alias.default, aten.clone.default, aten.detach.default):
        return True
    if node.target in (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default):
        src = structure.tensor_meta(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
        out = structure.tensor_meta(node)
        return src is not None and out is not None and src.dtype == out.dtype and src.device == out.device
    return False


def _plan_identity(graph: ModelGraph, context: PassContext) -> list[torch.fx.Node]:
    return found_or_refuse([n for n in graph.call_nodes() if _is_identity(n) or n.target in IMPURE_NOOPS],
                           "no identity ops (eval dropout, alias, no-op casts) in the graph")


@register_pass("remove_identity_ops", Exactness.EXACT, "drop eval-mode dropout, aliases and no-op casts",
               plan=_plan_identity, stage=Stage.CLEANUP)
def remove_identity_ops(graph: ModelGraph, identities: list[torch.fx.Node]) -> PassResult:
    removed = 0
    for node in identities:
        if node.target in IMPURE_NOOPS:
            graph.gm.graph.erase_node(node)
        else:
            node.replace_all_uses_with(node.args[0])
            graph.gm.graph.erase_node(node)
        removed += 1
    return PassResult(graph, removed > 0, f"removed {removed} identity ops")


def _plan_dead(graph: ModelGraph, context: PassContext) -> None:
    if not any(n.op in ("call_function", "get_attr") and not n.users and n.target not in IMPURE_NOOPS
               for n in graph.nodes()):
        raise PassRefused("no dead nodes")


@register_pass("eliminate_dead_code", Exactness.EXACT, "remove nodes whose results are never used",
               plan=_plan_dead, stage=Stage.CLEANUP, runs_after=("fold_constants",))
def eliminate_dead_code(graph: ModelGraph, plan: None) -> PassResult:
    before = len(graph.gm.graph.nodes)
    # fx's DCE keeps impure nodes; our no-op asserts are handled by remove_identity_ops.
    graph.gm.graph.eliminate_dead_code()
    graph.gm.delete_all_unused_submodules()
    removed = before - len(graph.gm.graph.nodes)
    return PassResult(graph, removed > 0, f"removed {removed} dead nodes")


def _plan_fold(graph: ModelGraph, context: PassContext) -> list[torch.fx.Node]:
    """Maximal constant nodes that feed input-dependent computation."""
    dependent = structure.input_dependent_nodes(graph)
    constant = {n for n in graph.call_nodes() if n not in dependent and n.target not in IMPURE_NOOPS}
    roots = []
    for node in constant:
        if any(user not in constant for user in node.users):
            value = structure.tensor_meta(node)
            if value is None or value.numel() == 0:
                continue
            roots.append(node)
    return found_or_refuse(roots, "no subgraph independent of input values")


def _read_bytes(node: torch.fx.Node, graph: ModelGraph) -> int:
    total = 0
    for arg in node.all_input_nodes:
        value = structure.tensor_meta(arg)
        if value is not None:
            total += value.numel() * value.element_size()
    return total


@register_pass("fold_constants", Exactness.EXACT, "precompute subgraphs that do not depend on input values",
               plan=_plan_fold, stage=Stage.CLEANUP, runs_after=("remove_identity_ops",))
def fold_constants(graph: ModelGraph, roots: list[torch.fx.Node]) -> PassResult:
    keep = []
    for node in roots:
        out = structure.tensor_meta(node)
        out_bytes = out.numel() * out.element_size()
        if out_bytes > MAX_FOLD_GROWTH * _read_bytes(node, graph) + FOLD_ALLOWANCE_BYTES:
            continue
        keep.append(node)
    values = structure.evaluate_nodes(graph, keep)
    folded = 0
    for node in keep:
        value = values[node]
        if not isinstance(value, torch.Tensor):
            continue
        attr = structure.add_constant(graph.gm, f"folded_{node.name}", value.contiguous())
        with graph.gm.graph.inserting_before(node):
            const = graph.gm.graph.get_attr(attr)
        const.meta.update(node.meta)
        node.replace_all_uses_with(const)
        folded += 1
    graph.gm.graph.eliminate_dead_code()
    return PassResult(graph, folded > 0, f"folded {folded} constant subgraphs")
