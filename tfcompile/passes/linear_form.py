"""One form for linear layers: ``matmul(x, W) (+ b)`` with constant W and b into ``aten.linear``.

A model exported to ONNX comes back from the ONNX importer as ``MatMul`` + ``Add``
(traced as ``aten.matmul`` and ``aten.add``), where torch models trace to
``aten.linear``. The passes that read linear layers (projection merges, norm
affine folding, FFN structure, int8 quantization) look for ``aten.linear``, so
on an ONNX input they all refused. ``matmul_to_linear`` rewrites every
``matmul``/``mm`` whose right operand is a constant 2-D weight ``[in, out]`` into
``linear(x, Wᵀ)``, taking in a following ``add`` of a constant ``[out]`` bias.

Preconditions: a matmul whose second operand is a model attribute of rank 2
and floating type; the bias only when the matmul's one reader adds a rank-1
attribute of the output width. Exact: the same products and sums, the bias
added to the same accumulated values (a fused epilogue rounds once, as the
separate add did).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from tfcompile import structure
from tfcompile.graph import ModelGraph, fetch_attr
from tfcompile.passes.base import Exactness, PassResult, Stage, found_or_refuse, register_pass
from tfcompile.passes.context import PassContext

aten = torch.ops.aten

MATMUL_OPS = (aten.matmul.default, aten.mm.default)


@dataclasses.dataclass(frozen=True)
class MatmulSite:
    node: torch.fx.Node
    weight: torch.fx.Node
    bias_add: torch.fx.Node | None
    bias: torch.fx.Node | None


def _constant(graph: ModelGraph, node, rank: int) -> bool:
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return False
    value = fetch_attr(graph.gm, node.target)
    return isinstance(value, torch.Tensor) and value.dim() == rank and value.is_floating_point()


def _bias_of(graph: ModelGraph, node: torch.fx.Node, width: int) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    if len(node.users) != 1:
        return None
    add = next(iter(node.users))
    if add.target is not aten.add.Tensor or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    if other is node or not _constant(graph, other, 1) or fetch_attr(graph.gm, other.target).shape[0] != width:
        return None
    return add, other


def _plan(graph: ModelGraph, context: PassContext) -> list[MatmulSite]:
    sites = []
    for node in graph.call_nodes():
        if node.target not in MATMUL_OPS or len(node.args) != 2:
            continue
        x, weight = node.args
        if not isinstance(x, torch.fx.Node) or x.op == "get_attr" or not _constant(graph, weight, 2):
            continue
        width = fetch_attr(graph.gm, weight.target).shape[1]
        found = _bias_of(graph, node, width)
        sites.append(MatmulSite(node, weight, *(found or (None, None))))
    return found_or_refuse(sites, "no matmul with a constant weight: linear layers are already aten.linear")


@register_pass("matmul_to_linear", Exactness.EXACT,
               "matmul by a constant weight (+ a constant bias add), as ONNX inputs have them, into aten.linear",
               plan=_plan, stage=Stage.CLEANUP)
def matmul_to_linear(graph: ModelGraph, sites: list[MatmulSite]) -> PassResult:
    gm = graph.gm
    transposed: dict[str, str] = {}
    with_bias = 0
    for site in sites:
        if site.weight.target not in transposed:
            weight = fetch_attr(gm, site.weight.target)
            transposed[site.weight.target] = structure.add_constant(gm, str(site.weight.target) + "_t",
                                                                    weight.t().contiguous())
        replaced = site.bias_add if site.bias_add is not None else site.node
        with gm.graph.inserting_before(replaced):
            args = (site.node.args[0], gm.graph.get_attr(transposed[site.weight.target]))
            if site.bias is not None:
                args += (site.bias,)
                with_bias += 1
            linear = gm.graph.call_function(aten.linear.default, args)
        linear.meta.update(replaced.meta)
        replaced.replace_all_uses_with(linear)
        gm.graph.erase_node(replaced)
        if site.bias_add is not None:
            gm.graph.erase_node(site.node)
    gm.graph.eliminate_dead_code()
    return PassResult(graph, True, f"{len(sites)} matmuls into linear layers ({with_bias} with their bias)")
