"""Linear layers, input dependence, module paths and new constants: the basics every pass uses."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from tfcompile.graph import ModelGraph, fetch_attr

aten = torch.ops.aten


# Ops whose result depends on an input tensor's shape, dtype or device only,
# never on its values: with static shapes they are constants.
SHAPE_ONLY_OPS = {
    aten.new_ones.default,
    aten.new_zeros.default,
    aten.new_full.default,
    aten.ones_like.default,
    aten.zeros_like.default,
    aten.full_like.default,
    aten.sym_size.int,
}

# Ops whose results are not a function of their arguments.
NONDETERMINISTIC_OPS = {
    aten.rand.default,
    aten.randn.default,
    aten.randint.default,
    aten.rand_like.default,
    aten.randn_like.default,
    aten.bernoulli.default,
    aten.empty.memory_format,
    aten.new_empty.default,
    aten.empty_like.default,
}


@dataclasses.dataclass(frozen=True)
class LinearSite:
    """An ``aten.linear(x, W, b)`` whose W (and b) are model attributes."""

    node: torch.fx.Node
    input: torch.fx.Node
    weight_target: str
    bias_target: str | None

    def weight(self, graph: ModelGraph) -> torch.Tensor:
        return fetch_attr(graph.gm, self.weight_target)

    def bias(self, graph: ModelGraph) -> torch.Tensor | None:
        return None if self.bias_target is None else fetch_attr(graph.gm, self.bias_target)


def linear_sites(graph: ModelGraph) -> list[LinearSite]:
    sites = []
    for node in graph.call_nodes():
        if node.target is not aten.linear.default:
            continue
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
            continue
        if b is not None and not (isinstance(b, torch.fx.Node) and b.op == "get_attr"):
            continue
        sites.append(LinearSite(node, x, w.target, None if b is None else b.target))
    return sites


def input_dependent_nodes(graph: ModelGraph) -> set[torch.fx.Node]:
    """Nodes whose value can change when the model's input values change."""
    dependent: set[torch.fx.Node] = set()
    for node in graph.gm.graph.nodes:
        if node.op == "placeholder":
            dependent.add(node)
        elif node.op == "call_function":
            if node.target in NONDETERMINISTIC_OPS:
                dependent.add(node)
            elif node.target in SHAPE_ONLY_OPS:
                continue
            elif any(arg in dependent for arg in node.all_input_nodes):
                dependent.add(node)
        elif node.op in ("call_module", "call_method"):
            if any(arg in dependent for arg in node.all_input_nodes):
                dependent.add(node)
    return dependent


def module_path(node: torch.fx.Node) -> str:
    """The innermost module the node was traced from, e.g. 'm.transformer.h.3.attn'."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def tensor_meta(node: torch.fx.Node) -> torch.Tensor | None:
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def unique_attr_name(gm: torch.fx.GraphModule, base: str) -> str:
    base = base.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_constant(gm: torch.fx.GraphModule, base: str, value: torch.Tensor) -> str:
    """Register ``value`` as a new buffer on ``gm`` and return its attribute name."""
    name = unique_attr_name(gm, base)
    gm.register_buffer(name, value.detach(), persistent=True)
    return name
