"""Greedy choice of the layers to sparsify, on held-out inputs (AxFormer's layer selection).

AxFormer walks the layers 0..L−1 on a held-out split: it adds layer i to the
set and keeps it only if the validation loss beats the best so far and more
than half of the samples do no worse than the baseline; otherwise it reverts.
Post-hoc here there are no labels, so the loss is replaced by the variant's
quality figure against the dense model (top-1 agreement for logits, mean
cosine otherwise, ``tfcompile.verify``), and the rule becomes: keep layer i
when, with it added, the mean quality over the held-out samples is still at
least ``budget`` **and** more than half of the samples individually reach the
budget. The search is monotone (a layer rejected once is not tried again) and
costs one variant build and one run per held-out sample for each layer tried.

Held-out samples must be inputs other than the graph's example inputs (the
ones the search later verifies on) and have the same shapes (variants are
static-shape).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import torch

from tfcompile.graph import ModelGraph
from tfcompile.passes import PassContext, apply_pass
from tfcompile import structure
from tfcompile.verify import compare_outputs


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    layers: list[int]  # accepted layer indices (attention nodes in graph order)
    quality: float  # mean held-out quality of the accepted set (1.0 when empty)
    trace: list[dict[str, Any]]  # one entry per layer tried: layer, quality, share, accepted


def choose_layers(graph: ModelGraph, pass_name: str, heldout: Sequence[tuple[torch.Tensor, ...]], *,
                  budget: float, order: Iterable[int] | None = None, context: PassContext | None = None,
                  **knobs: Any) -> LayerChoice:
    """Greedily pick the layers ``pass_name`` (with ``knobs``) may sparsify within ``budget``."""
    if not heldout:
        raise ValueError("choose_layers needs at least one held-out input tuple")
    count = len(structure.attention_sites(graph))
    references = [graph.run(tuple(inputs)) for inputs in heldout]
    accepted: list[int] = []
    best = 1.0
    trace: list[dict[str, Any]] = []
    for layer in (range(count) if order is None else order):
        trial = sorted(accepted + [int(layer) % count])
        variant, outcome = apply_pass(graph, pass_name, context, layers=trial, **knobs)
        if not outcome.applied:
            trace.append({"layer": layer, "accepted": False, "reason": outcome.reason})
            continue
        scores = [compare_outputs(ref, variant.run(tuple(inputs)), graph.output_names).quality
                  for ref, inputs in zip(references, heldout)]
        mean = sum(scores) / len(scores)
        share = sum(s >= budget for s in scores) / len(scores)
        keep = mean >= budget and share > 0.5
        trace.append({"layer": layer, "quality": mean, "share_within_budget": share, "accepted": keep})
        if keep:
            accepted, best = trial, mean
    return LayerChoice(accepted, best, trace)
