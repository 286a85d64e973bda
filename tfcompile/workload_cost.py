"""Variants over a workload: a prediction per scenario, the expected latency, and where it holds.

The search prunes at the traced shape (rebuilding every candidate at every
scenario would multiply its cost by the number of scenarios); the variants
it keeps are then priced at every scenario of the workload and ranked by the
expected latency. Per scenario:

- the original model at that batch shape: the traced graph itself when the
  scenario has the traced ``[batch, seq]`` (only the example inputs change,
  a ragged batch's mask and pad ids among them), else ``load_at(batch, seq)``;
- the variant's pipeline rebuilt on it with that scenario's lengths in the
  context, and the context's cost model's prediction for that graph;
- for variants that do not bake a shape in, the *same* variant graph run on
  that scenario's inputs and verified against the original: a variant that
  is meant to serve every batch must be right on batches it never saw.

A variant whose passes bake the traced batch's valid lengths in
(``lengths_specific``) serves only batches with exactly those lengths; on a
workload whose batches differ it is not ranked, and says so.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from tfcompile.errors import ShapeError
from tfcompile.graph import ModelGraph
from tfcompile.passes import PassContext, get_pass
from tfcompile.passes.padding import with_lengths
from tfcompile.variants import Variant, build_variant
from tfcompile.verify import verify
from tfcompile.workload import Scenario

LoadAt = Callable[[int, int], ModelGraph]  # the original model traced at (batch, seq)


@dataclasses.dataclass
class WorkloadPrice:
    scenario_ms: list[float]  # the target's prediction per scenario, in the workload's order
    expected_ms: float
    ineligible: str = ""  # why the variant cannot serve this workload ("" when it can)
    worst_rel_err: float | None = None  # exact variants run on every scenario's inputs: the worst deviation


class ScenarioGraphs:
    """The original model at each scenario: traced once per batch shape, re-fed per scenario's lengths."""

    def __init__(self, original: ModelGraph, load_at: LoadAt | None):
        self.original, self.load_at = original, load_at
        self.traced_shape = _batch_shape(original)
        self._by_shape: dict[tuple[int, int], ModelGraph] = {self.traced_shape: original}

    def same_shape(self, scenario: Scenario) -> bool:
        return (scenario.batch, scenario.seq) == self.traced_shape

    def __call__(self, scenario: Scenario) -> ModelGraph:
        shape = (scenario.batch, scenario.seq)
        if shape not in self._by_shape:
            if self.load_at is None:
                raise ShapeError(f"{self.original.name} was traced at batch {shape[0]} and sequence {shape[1]} "
                                 "only; this model source cannot be traced at other shapes")
            graph = self.load_at(*shape)
            if _batch_shape(graph) != shape:  # a factory or file that brings its own inputs ignores the shape
                raise ShapeError(f"{self.original.name} was traced at batch {self.traced_shape[0]} and sequence "
                                 f"{self.traced_shape[1]} only: its source fixes the input shape, so it cannot "
                                 "serve a workload of other shapes")
            self._by_shape[shape] = graph
        graph = self._by_shape[shape]
        return with_lengths(graph, list(scenario.lengths)) if scenario.lengths is not None else graph


def check_traced_shape(graph: ModelGraph, batch: int, seq: int) -> None:
    """Before the search: a workload of several batches needs a model traced at the shape asked for."""
    if _batch_shape(graph) != (batch, seq):
        traced = _batch_shape(graph)
        raise ShapeError(f"{graph.name} was traced at batch {traced[0]} and sequence {traced[1]} only: its source "
                         f"fixes the input shape (asked for batch {batch}, sequence {seq}), so it cannot serve a "
                         "workload of several batches")


def _batch_shape(graph: ModelGraph) -> tuple[int, int]:
    first = graph.example_inputs[0]
    return (int(first.shape[0]), int(first.shape[1]) if first.dim() > 1 else 1)


def price_over_workload(variants: dict[str, Variant], graphs: ScenarioGraphs, context: PassContext,
                        progress: Callable[[str], None] = lambda _: None) -> dict[str, WorkloadPrice]:
    workload = context.workload
    scenario_ms: dict[str, list[float]] = {name: [] for name in variants}
    ineligible = {name: _lengths_gap(variant, workload.scenarios, context) for name, variant in variants.items()}
    worst: dict[str, float] = {}
    for scenario in workload.scenarios:
        progress(f"pricing the variants at {scenario.label}")
        original = graphs(scenario)
        at_scenario = _context_at(context, scenario)
        reference = original.run() if graphs.same_shape(scenario) else None
        for name, variant in variants.items():
            rebuilt = build_variant(original, variant.spec, at_scenario)
            scenario_ms[name].append(context.cost_model.predict(rebuilt.graph).latency_s * 1e3)
            if reference is not None and variant.exact and not ineligible[name]:
                check = verify(original, variant.graph, reference, lengths=scenario.lengths)
                worst[name] = max(worst.get(name, 0.0), check.max_rel_err)
    return {name: WorkloadPrice(ms, workload.expected(ms), ineligible[name], worst.get(name))
            for name, ms in scenario_ms.items()}


def _context_at(context: PassContext, scenario: Scenario) -> PassContext:
    """The run's context with the traced batch's lengths replaced by ``scenario``'s: what the passes plan on."""
    return dataclasses.replace(context, workload=dataclasses.replace(context.workload, lengths=scenario.lengths))


def _lengths_gap(variant: Variant, scenarios, context: PassContext) -> str:
    specific = [p for p in variant.applied_passes if get_pass(p).lengths_specific]
    traced = context.workload.lengths
    if specific and any(s.lengths != traced for s in scenarios):
        return (f"{specific[0]} is specialised to the traced batch's lengths and would be wrong on the "
                "workload's other batches")
    return ""


def scenario_graphs_for_measurement(variant: Variant, graphs: ScenarioGraphs,
                                    context: PassContext) -> list[ModelGraph]:
    """What a deployment of ``variant`` runs per scenario: its own graph fed the scenario's inputs where the
    shape is the traced one, else the pipeline rebuilt at that shape."""
    runs = []
    for i, scenario in enumerate(context.workload.scenarios):
        original = graphs(scenario)
        if graphs.same_shape(scenario):
            graph = dataclasses.replace(variant.graph, example_inputs=original.example_inputs)
        else:
            at_scenario = _context_at(context, scenario)
            graph = build_variant(original, variant.spec, at_scenario).graph
        graph.name = f"{variant.name}@{i}"
        runs.append(graph)
    return runs
