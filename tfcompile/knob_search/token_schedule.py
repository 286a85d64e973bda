"""Keep-ratio schedules for ``prune_tokens`` and their search under a quality budget.

The quality figure is measured on the model itself: the pruned and the
unpruned graph run on the same real inputs (several static-shape batches of
the graph's own batch size), and the mean cosine similarity of their outputs
(sentence embeddings for minilm) is the figure. The search ranks candidate
schedules by the FLOPs they save (cost model) and returns the cheapest one
whose quality meets the budget, so only as many candidates are pruned and run
as it takes to find it. FLOPs come from the context's cost model
(``context.cost_model.predict``), the host CPU's roofline when no context is given.

This grid search scores and reports on the same inputs; ``optimize`` uses
``token_budget`` instead (a per-layer search on calibration text, reported on
held-out text). The helpers below (``batched``, ``outputs_on``,
``mean_cosine``) serve the benchmarks and tests.
"""

from __future__ import annotations

import dataclasses

import torch

from tfcompile.graph import ModelGraph
from tfcompile.passes.base import apply_pass
from tfcompile.passes.context import PassContext, default_context

# Knob settings the search tries, mildest to strongest; progressive ones follow the paper
# (prune a little after several early layers rather than much after one).
DEFAULT_GRID: tuple[dict, ...] = (
    {"keep_ratio": 0.9, "layers": [2]},
    {"keep_ratio": 0.8, "layers": [2]},
    {"keep_ratio": [0.9, 0.9], "layers": [1, 3]},
    {"keep_ratio": 0.8, "layers": [1], "sim_fraction": 0.0},
    {"keep_ratio": [0.9, 0.9, 0.9], "layers": [0, 1, 2]},
    {"keep_ratio": 0.7, "layers": [1]},
    {"keep_ratio": 0.8, "layers": [0], "sim_fraction": 1.0},
    {"keep_ratio": [0.8, 0.8], "layers": [0, 2]},
    {"keep_ratio": 0.6, "layers": [0], "sim_fraction": 1.0},
    {"keep_ratio": 0.5, "layers": [0], "sim_fraction": 1.0},
    # merge=True (ToMe sizes) measured best per FLOPs cut on minilm passages; progressive
    # schedules gain most from it (benchmarks/token_pruning.py).
    {"keep_ratio": 0.9, "layers": [0, 1, 2, 3, 4], "sim_fraction": 1.0, "merge": True},
    {"keep_ratio": 0.7, "layers": [0], "sim_fraction": 1.0, "merge": True},
    {"keep_ratio": [0.7, 0.9], "layers": [0, 2], "sim_fraction": 1.0, "merge": True},
    {"keep_ratio": 0.6, "layers": [0], "sim_fraction": 1.0, "merge": True},
)


@dataclasses.dataclass(frozen=True)
class ScheduleResult:
    knobs: dict
    summary: str
    flops_cut: float  # 1 - pruned FLOPs / unpruned FLOPs (cost model)
    quality: float  # mean cosine against the unpruned model
    graph: ModelGraph | None


def batched(inputs: tuple[torch.Tensor, ...], batch: int) -> list[tuple[torch.Tensor, ...]]:
    """Split [M, ...] inputs into whole batches of the graph's static batch size (the rest is dropped)."""
    count = inputs[0].shape[0] // batch
    return [tuple(t[i * batch:(i + 1) * batch] for t in inputs) for i in range(count)]


def outputs_on(graph: ModelGraph, batches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """The first output over every batch, concatenated along the batch axis."""
    return torch.cat([graph.run(b)[0] for b in batches])


def mean_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    ref, got = reference.flatten(1).double(), candidate.flatten(1).double()
    return torch.nn.functional.cosine_similarity(ref, got, dim=1).mean().item()


def evaluate(graph: ModelGraph, knobs: dict, batches, reference: torch.Tensor, base_flops: float,
             context: PassContext | None = None) -> ScheduleResult:
    context = context or default_context()
    pruned, outcome = apply_pass(graph, "prune_tokens", context, **knobs)
    if not outcome.applied:
        return ScheduleResult(knobs, outcome.reason, 0.0, 1.0, None)
    flops = context.cost_model.predict(pruned).flops
    return ScheduleResult(knobs, outcome.reason, 1 - flops / base_flops,
                          mean_cosine(reference, outputs_on(pruned, batches)), pruned)


def search_schedule(graph: ModelGraph, inputs: tuple[torch.Tensor, ...], budget: float,
                    grid=DEFAULT_GRID, context: PassContext | None = None,
                    ) -> tuple[ScheduleResult | None, list[ScheduleResult]]:
    """The schedule in ``grid`` that saves the most FLOPs (``context``'s cost model) with mean
    cosine ≥ ``budget`` on ``inputs`` (real text, several batches of the graph's batch size)."""
    context = context or default_context()
    batch = graph.example_inputs[0].shape[0]
    batches = batched(inputs, batch)
    if not batches:
        raise ValueError(f"need at least {batch} input rows (one batch) to measure quality")
    reference = outputs_on(graph, batches)
    base = context.cost_model.predict(graph).flops
    # Cheap first: FLOPs of every candidate from the cost model, then quality in that order.
    costed = []
    for knobs in grid:
        pruned, outcome = apply_pass(graph, "prune_tokens", context, **knobs)
        if outcome.applied:
            costed.append((1 - context.cost_model.predict(pruned).flops / base, knobs, outcome.reason, pruned))
    tried = []
    for cut, knobs, summary, pruned in sorted(costed, key=lambda c: -c[0]):
        result = ScheduleResult(knobs, summary, cut, mean_cosine(reference, outputs_on(pruned, batches)), pruned)
        tried.append(result)
        if result.quality >= budget:
            return result, tried
    return None, tried
