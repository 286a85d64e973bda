"""Variants: named pass pipelines applied to one original graph.

A variant records, per pass, whether it applied and why not, so a report can
explain itself. A variant is exact only if every pass that applied is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tfcompile.graph import ModelGraph, clone
from tfcompile.passes import (PassContext, PassOutcome, Stage, all_passes, apply_pass, check_pipeline, get_pass,
                              pass_order)

CLEANUP = tuple(pass_order([p.name for p in all_passes() if p.stage is Stage.CLEANUP]))


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    name: str
    passes: tuple[str, ...]
    knobs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Variant:
    spec: VariantSpec
    graph: ModelGraph
    outcomes: list[PassOutcome]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def applied_passes(self) -> list[str]:
        return [o.name for o in self.outcomes if o.applied]

    @property
    def exact(self) -> bool:
        return all(get_pass(name).exact for name in self.applied_passes)


BUILTIN_VARIANTS = (
    VariantSpec("baseline", ()),
    VariantSpec("cleanup", CLEANUP),
    VariantSpec("cleanup+merge_qkv", CLEANUP + ("merge_qkv_projections",)),
)


def custom_variant(pass_names: list[str]) -> VariantSpec:
    for name in pass_names:
        get_pass(name)  # raises UnknownPassError with the list of known passes
    check_pipeline(pass_names)
    return VariantSpec("custom:" + "+".join(pass_names), tuple(pass_names))


def build_variant(original: ModelGraph, spec: VariantSpec, context: PassContext | None = None) -> Variant:
    graph = clone(original, name=spec.name)
    outcomes = []
    for name in spec.passes:
        graph, outcome = apply_pass(graph, name, context, **spec.knobs.get(name, {}))
        outcomes.append(outcome)
    graph.name = spec.name
    return Variant(spec, graph, outcomes)


def extend_variant(parent: Variant, spec: VariantSpec, context: PassContext | None = None) -> Variant:
    """``parent`` plus the one pass ``spec`` adds to its pipeline, without re-running the parent's passes.

    The search extends its frontier one pass at a time; rebuilding every child
    from the original would re-run the whole pipeline (quadratic in its length).
    """
    if parent.graph is None or spec.passes[:-1] != parent.spec.passes:
        raise ValueError(f"{spec.name} does not extend {parent.name} by one pass")
    name = spec.passes[-1]
    graph, outcome = apply_pass(parent.graph, name, context, **spec.knobs.get(name, {}))
    if graph is not parent.graph:  # a refused pass hands back the parent's graph: leave its name alone
        graph.name = spec.name
    return Variant(spec, graph, parent.outcomes + [outcome])
