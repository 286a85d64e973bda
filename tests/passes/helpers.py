"""Shared check for exact passes: clone, apply, assert it fired, compare numerically."""

from __future__ import annotations

import torch

from tfcompile.graph import ModelGraph
from tfcompile.passes import apply_pass, get_pass
from tfcompile.verify import compare_outputs


def assert_rewrite_preserves(graph: ModelGraph, pass_name: str, *, rel_tol: float) -> ModelGraph:
    nodes_before = [(n.name, n.target) for n in graph.gm.graph.nodes]
    reference = graph.run()
    rewritten, outcome = apply_pass(graph, pass_name)
    assert outcome.applied, f"{pass_name} did not apply: {outcome.reason}"
    assert get_pass(pass_name).exact
    check = compare_outputs(reference, rewritten.run(graph.example_inputs))
    assert check.max_rel_err <= rel_tol, f"{pass_name}: relative error {check.max_rel_err:.2e} > {rel_tol}"
    # A pass never mutates its input.
    assert [(n.name, n.target) for n in graph.gm.graph.nodes] == nodes_before
    return rewritten


def to_float64(graph: ModelGraph) -> ModelGraph:
    """The same graph with every floating parameter and input in float64."""
    graph.gm.to(torch.float64)
    graph.example_inputs = tuple(t.double() if t.is_floating_point() else t for t in graph.example_inputs)
    return graph
