"""Evaluating parts of a graph on its example inputs."""

from __future__ import annotations


import torch
import torch.fx

from tfcompile.graph import ModelGraph, fetch_attr
from tfcompile.structure.core import SHAPE_ONLY_OPS, tensor_meta

aten = torch.ops.aten


# ---------------------------------------------------------------------------
# Evaluating parts of a graph


def _concrete(shape) -> list[int]:
    """A shape with each symbolic size replaced by its traced example. Only shape reads get such a stand-in,
    and a graph traced with symbolic sizes keeps reads whose result is symbolic out of constant folding,
    so what is evaluated here does not depend on the sizes replaced."""
    return [d if isinstance(d, int) else (d.node.hint if d.node.hint is not None else 1) for d in shape]


def evaluate_nodes(graph: ModelGraph, nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, object]:
    """The values of ``nodes`` on the example inputs, running only the ops they depend on.

    Ops that read only an input's shape (``SHAPE_ONLY_OPS``) get an empty tensor
    of that shape, so a constant built from an activation's shape does not
    evaluate the activation.
    """
    needed: set[torch.fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if not (node.op == "call_function" and node.target in SHAPE_ONLY_OPS):
            stack.extend(node.all_input_nodes)
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    env: dict[torch.fx.Node, object] = {}

    def shape_stand_in(arg: torch.fx.Node) -> object:
        fake = tensor_meta(arg)
        return torch.empty(_concrete(fake.shape), dtype=fake.dtype) if fake is not None else env[arg]

    with torch.no_grad():
        for node in graph.gm.graph.nodes:
            if node not in needed:
                continue
            if node.op == "placeholder":
                env[node] = graph.example_inputs[placeholders.index(node)]
            elif node.op == "get_attr":
                env[node] = fetch_attr(graph.gm, node.target)
            elif node.op == "call_function":
                read = shape_stand_in if node.target in SHAPE_ONLY_OPS else env.__getitem__
                env[node] = node.target(*torch.fx.node.map_arg(node.args, read),
                                        **torch.fx.node.map_arg(node.kwargs, read))
            else:
                raise ValueError(f"{node.name} ({node.op}) cannot be evaluated")
    return {n: env[n] for n in nodes}
