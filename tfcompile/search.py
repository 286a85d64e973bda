"""Variant search: which passes, in which combination, for this target.

Passes are tried in the order their declarations give (``pass_order``: by
stage, projection merges, norm rewrites, FFN structure, attention, tokens,
padding, and each after the passes it ``runs_after``). Every variant in
the frontier branches on the next pass: without it, or with it for each knob
setting (when it applies). Each new variant is verified against the original
(results cached by pipeline) and costed on the target; the frontier keeps the
``beam_width`` fastest eligible variants by predicted latency. Exact passes
are always allowed; approximate ones only with ``allow_approx``, and a variant
whose quality falls below the budget is reported but never extended.

With ``allow_approx`` and calibration text for the model (``QualitySplits``:
real-text passages for the zoo's sentence encoders), the token passes' knob
settings are not a fixed grid: ``budget_knob_grid`` searches a per-layer
schedule for each (``knob_search.token_budget``) on the calibration split,
driven by the quality budget, and the search tries what that found. The
chosen variant's quality is then reported on the held-out split (``optimize``).

The target decides: the same search on another device spec or batch size can
pick another pipeline, because the objective is that target's cost model. The
search and every pass read one ``PassContext`` (target, backend, cost model,
workload); the knob grid holds only what tells variants apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from tfcompile.knob_search.token_budget import SEARCHES, budget_schedules
from tfcompile.passes import PassContext, Stage, all_passes, get_pass, pass_order
from tfcompile.variants import CLEANUP, Variant, VariantSpec, build_variant, extend_variant

def default_knob_grid() -> dict[str, list[dict[str, Any]]]:
    """Knob settings the search tries; FFN passes decide per layer with the context's cost model."""
    return {
        "structure_ffn": [{"rank_ratio": 0.5}, {"max_weight_error": 0.1}],
        # A mild late cut (by importance) and a deep early one (by key similarity): on minilm
        # these were the best at ~10 % and ~34 % FLOPs (benchmarks/token_pruning.py).
        # Blockwise local attention pays once the sequence is several windows long; top-k keeps the
        # dense scores, so it is slower without a sparse kernel and stays out of the default grid.
        # The third entry (two full layers, quarter-window tiles) kept minilm at 4096 tokens above
        # cosine 0.99 at 1.70x on ORT (benchmarks/attention_sparsity.py).
        "local_attention": [{"window": 128}, {"window": 256, "full_layers": [0]},
                            {"window": 512, "block": 128, "full_layers": [0, 1]}],
        "prune_tokens": [{"keep_ratio": 0.8, "layers": [2], "sim_fraction": 0.0},
                         {"keep_ratio": 0.6, "layers": [0], "sim_fraction": 1.0}],
        # Tokens merged per layer (absolute, as in ToMe): on minilm at 128 tokens r = 12 kept the
        # embedding cosine at 0.982 for a 28.5 % FLOPs cut; shorter inputs refuse what they cannot merge.
        "merge_tokens": [{"r": 4}, {"r": 12}],
        # The pass refuses the type the target has no faster arithmetic or kernel for.
        "half_precision": [{"dtype": "fp16"}, {"dtype": "bf16"}],
        # One attention per run of equal lengths, or one variable-length kernel where the runtime has one.
        "remove_padding": [{"attention": "per_length"}, {"attention": "varlen"}],
    }


def budget_knob_grid(original, splits, budget: float, context: PassContext, settings: SearchSettings,
                     progress: Callable[[str], None] = lambda _: None,
                     max_trials: int | None = None) -> tuple[SearchSettings, dict[str, Any]]:
    """``settings`` with the default grid, each token pass's settings replaced by the schedule the budget
    drove (``knob_search.token_budget`` on ``splits``' calibration rows); and those searches' records.

    A token pass with no schedule within budget is left out of the search (its refusal says why).
    """
    grid, unsearched = default_knob_grid(), {}
    wanted = [n for n in searchable_passes(settings) if n in SEARCHES]
    schedules = budget_schedules(original, splits, budget, context, wanted, progress, max_trials)
    for name, schedule in schedules.items():
        grid[name] = [schedule.knobs] if schedule.knobs is not None else []
        if schedule.knobs is None:
            unsearched[name] = schedule.why_none(budget)
    return dataclasses.replace(settings, knob_grid=grid, unsearched=unsearched), schedules


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    allow_approx: bool = False
    beam_width: int = 6
    knob_grid: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    unsearched: dict[str, str] = dataclasses.field(default_factory=dict)  # pass -> why it gets no knob setting


def searchable_passes(settings: SearchSettings) -> list[str]:
    registered = {p.name: p for p in all_passes()}
    return [n for n in pass_order() if registered[n].stage is not Stage.CLEANUP
            and n not in settings.exclude and (registered[n].exact or settings.allow_approx)]


# Why a stage's passes are not searched on a generation loop's graphs.
GENERATION_GAPS = {
    Stage.TOKENS: "a cached decoder keeps every prompt token's key and value for the later steps, and a decode "
                  "step holds one token per sequence: token pruning and merging do not apply to generation",
    Stage.PADDING: "in generation a padded prompt batch is prepacked (tfcompile.generation.prepack), not "
                   "unpadded; the decode step holds one token per sequence",
    Stage.ATTENTION: "approximate attention on a static cache would need a rolling cache for local windows; "
                     "not searched for generation yet",
}


def _workload_gap(name: str, context: PassContext) -> str | None:
    """Why the workload gives ``name`` nothing to work on (None if it does)."""
    pass_ = get_pass(name)
    if context.workload.generation is not None and pass_.stage in GENERATION_GAPS:
        return GENERATION_GAPS[pass_.stage]
    if pass_.stage is Stage.PADDING and context.workload.lengths is None:
        return "needs the batch's lengths (give --lengths or --lengths-file)"
    workload = context.workload
    if pass_.lengths_specific and any(s.lengths != workload.lengths for s in workload.scenarios):
        # Its variants would hold beam places and then be refused by the workload pricing.
        return "specialised to one batch's lengths; the workload's batches have other lengths"
    return None


def _spec_name(passes: tuple[str, ...], knobs: dict[str, dict[str, Any]]) -> str:
    if not passes:
        return "baseline"
    parts, rest = [], passes
    if passes[: len(CLEANUP)] == CLEANUP:
        parts, rest = ["cleanup"], passes[len(CLEANUP):]
    for name in rest:
        extra = knobs.get(name, {})
        parts.append(name + ("(" + ",".join(f"{k}={v}" for k, v in sorted(extra.items())) + ")" if extra else ""))
    return "+".join(parts)


@dataclasses.dataclass
class Candidate:
    variant: Variant
    latency_s: float  # predicted on the target
    eligible: bool


@dataclasses.dataclass
class SearchResult:
    candidates: list[Candidate]
    refusals: dict[str, str]  # pass -> why it did not apply, the first time it was tried
    kept: set[str]  # names of candidates whose graphs are still held (the final frontier and baseline)


Evaluate = Callable[[Variant], Candidate]


def search(original, evaluate: Evaluate, settings: SearchSettings, context: PassContext,
           progress: Callable[[str], None] = lambda _: None) -> SearchResult:
    seen: dict[tuple, Candidate] = {}
    refusals: dict[str, str] = {}

    def visit(spec: VariantSpec, parent: Variant | None = None) -> Candidate | None:
        variant = (extend_variant(parent, spec, context) if parent is not None
                   else build_variant(original, spec, context))
        for outcome in variant.outcomes:
            if not outcome.applied:
                refusals.setdefault(outcome.name, outcome.reason)
        key = tuple((o.name, repr(sorted(spec.knobs.get(o.name, {}).items())))
                    for o in variant.outcomes if o.applied)
        if key in seen:  # the last pass did not apply, or another order reached the same pipeline
            return None
        progress(f"evaluating {spec.name}")
        candidate = evaluate(variant)
        seen[key] = candidate
        return candidate

    baseline = visit(VariantSpec("baseline", ()))
    start = visit(VariantSpec("cleanup", CLEANUP))
    frontier = [start or baseline]
    for name in searchable_passes(settings):
        gap = _workload_gap(name, context)
        if gap is not None:
            refusals[name] = gap
            continue
        settings_for = settings.knob_grid.get(name, [{}])
        if name in settings.unsearched or not settings_for:
            refusals[name] = settings.unsearched.get(name, "no knob setting to try")
            continue
        children = []
        for parent in frontier:
            for knobs in settings_for:
                passes = parent.variant.spec.passes + (name,)
                all_knobs = {**parent.variant.spec.knobs, name: knobs}
                child = visit(VariantSpec(_spec_name(passes, all_knobs), passes, all_knobs), parent.variant)
                if child is not None:
                    children.append(child)
        pool = [c for c in frontier + children if c.eligible]
        frontier = sorted(pool, key=lambda c: c.latency_s)[: settings.beam_width] or frontier
        _release_graphs(seen.values(), keep=frontier + [baseline])
    for name in refusals.copy():
        if any(name in c.variant.applied_passes for c in seen.values()):
            del refusals[name]  # it applied somewhere: no refusal to explain
    return SearchResult(list(seen.values()), refusals, {c.variant.name for c in frontier + [baseline]})


def _release_graphs(candidates, keep) -> None:
    """Variants outside the frontier are never extended or exported: free their weights."""
    keep_ids = {id(c) for c in keep}
    for candidate in candidates:
        if id(candidate) not in keep_ids and candidate.variant.graph is not None:
            candidate.variant.graph = None
