"""Per-layer token schedules chosen by the quality budget, on calibration text (no knobs from the user).

For ``merge_tokens`` (ToMe) the schedule is how many tokens each layer merges
(``r`` per layer); for ``prune_tokens`` (Zero-TPrune with ToMe sizes) the keep
ratio after each of the early layers. Both are searched on the calibration
split of ``QualitySplits`` against one acceptance rule: a schedule is
**within budget** when the lower confidence bound of its calibration figure,
mean − ``Z``·(standard error of the mean over the calibration rows), is at
least the budget. The margin is the sampling noise of the calibration mean, so
a schedule that only scrapes past the budget on the rows it was tuned on is
not taken (on minilm passages of 128 tokens the held-out figure sat
0.002–0.004 below the calibration one).

``merge_tokens`` search:
1. bisection on a uniform ``r`` (the same count in every layer) for the
   largest within budget (the quality falls as ``r`` grows);
2. greedy top-up, "the next-cheapest cut": from the deepest layer to the first,
   try merging ``step`` more tokens in that layer and keep the change when the
   schedule stays within budget; a layer that fails is not tried again. Deep
   layers go first because a merge there costs the least quality (fewer layers
   carry the averaged state), which gives ToMe's progressive schedules.
``prune_tokens`` search: bisection on how many tokens are dropped after each
of layers 0..L−2 (a progressive cut, the same count each time), and on how
many are dropped after the middle layer alone (one cut); the larger cut within
budget wins. Both with
key-similarity drops and merged sizes (``merge=True``, the best quality per
FLOPs cut measured in ``benchmarks/token_pruning.py``).

The FLOPs cut is the context's cost model on the variant against the graph
searched. Each candidate costs one pass application and one run of the
calibration rows; the held-out split is never read here (``optimize`` reports
it for the variant the search keeps).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from tfcompile import structure
from tfcompile.graph import ModelGraph
from tfcompile.knob_search.quality_data import QualitySplits, SplitFigure
from tfcompile.passes import PassContext, apply_pass

Z = 2.0  # one-sided lower bound at about 97.7 % under a normal approximation of the mean
MAX_TRIALS = 12  # candidates per pass (bisection plus top-up)


def within_budget(figure: SplitFigure, budget: float) -> bool:
    return figure.quality - Z * figure.stderr >= budget


@dataclasses.dataclass(frozen=True)
class Trial:
    knobs: dict[str, Any]
    flops_cut: float  # 1 − variant FLOPs / searched graph's FLOPs
    calibration: SplitFigure | None  # None: the pass refused (``reason``)
    accepted: bool
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        fig = self.calibration
        return {"knobs": self.knobs, "flops_cut": self.flops_cut, "accepted": self.accepted,
                "calibration": None if fig is None else round(fig.quality, 5),
                "stderr": None if fig is None else round(fig.stderr, 5), "reason": self.reason}


@dataclasses.dataclass
class Schedule:
    pass_name: str
    knobs: dict[str, Any] | None  # the chosen schedule; None when nothing was within budget
    flops_cut: float
    calibration: SplitFigure | None
    trials: list[Trial]

    def why_none(self, budget: float) -> str:
        tried = [t for t in self.trials if t.calibration is not None]
        if not tried:
            refusal = next((t.reason for t in self.trials), "no schedule to try")
            return f"no {self.pass_name} schedule applied: {refusal}"
        mildest = min(tried, key=lambda t: t.flops_cut)
        fig = mildest.calibration
        return (f"no {self.pass_name} schedule within budget {budget} on the calibration text: the mildest tried, "
                f"{_short(mildest.knobs)} ({mildest.flops_cut:.1%} FLOPs), scored {fig.metric} {fig.quality:.4f} "
                f"± {fig.stderr:.4f}")


class _Judge:
    """Builds, costs and scores candidates of one pass; remembers every trial."""

    def __init__(self, graph: ModelGraph, pass_name: str, splits: QualitySplits, budget: float,
                 context: PassContext, progress: Callable[[str], None]):
        self.graph, self.pass_name, self.splits, self.budget, self.context = graph, pass_name, splits, budget, context
        self.base_flops = context.cost_model.predict(graph).flops
        self.progress = progress
        self.trials: list[Trial] = []

    def __call__(self, knobs: dict[str, Any]) -> Trial:
        for trial in self.trials:
            if trial.knobs == knobs:
                return trial
        self.progress(f"calibrating {self.pass_name}({_short(knobs)})")
        variant, outcome = apply_pass(self.graph, self.pass_name, self.context, **knobs)
        if not outcome.applied:
            trial = Trial(knobs, 0.0, None, False, outcome.reason)
        else:
            cut = 1 - self.context.cost_model.predict(variant).flops / self.base_flops
            figure = self.splits.figure(variant, "calibration")
            trial = Trial(knobs, cut, figure, within_budget(figure, self.budget))
        self.trials.append(trial)
        return trial

    def result(self, best: Trial | None) -> Schedule:
        if best is None:
            return Schedule(self.pass_name, None, 0.0, None, self.trials)
        return Schedule(self.pass_name, best.knobs, best.flops_cut, best.calibration, self.trials)


def _short(knobs: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(knobs.items()))


def _largest_within(judge: _Judge, make: Callable[[int], dict[str, Any]], low: int, high: int,
                    budget_left: Callable[[], bool]) -> tuple[int, Trial | None]:
    """Bisection for the largest strength in [low, high] whose candidate is within budget (0 and None if none)."""
    best, best_trial = 0, None
    while low <= high and budget_left():
        mid = (low + high) // 2
        trial = judge(make(mid))
        if trial.accepted:
            best, best_trial, low = mid, trial, mid + 1
        else:
            high = mid - 1
    return best, best_trial


def _sequence_and_layers(graph: ModelGraph) -> tuple[int, int]:
    sites = structure.attention_sites(graph)
    if not sites:
        return 0, 0
    return int(structure.shape_of(sites[0].node.args[0])[2]), len(sites)


def merge_schedule(graph: ModelGraph, splits: QualitySplits, budget: float, context: PassContext, *,
                   max_trials: int = MAX_TRIALS, progress: Callable[[str], None] = lambda _: None) -> Schedule:
    """The ``merge_tokens`` schedule (``r`` per layer) with the largest FLOPs cut found within budget."""
    judge = _Judge(graph, "merge_tokens", splits, budget, context, progress)
    seq, layers = _sequence_and_layers(graph)
    if layers == 0:
        return judge.result(None)
    # The largest uniform r every layer can merge (a layer merges at most its A half but CLS).
    ceiling = max((n for n in range(1, seq) if all(n <= (seq - k * n + 1) // 2 - 1 for k in range(layers))),
                  default=0)
    left = lambda: len(judge.trials) < max_trials  # noqa: E731
    r, best = _largest_within(judge, lambda n: {"r": n}, 1, ceiling, left)
    if best is None:
        return judge.result(None)
    schedule = [r] * layers
    step = max(1, r // 4)
    for layer in reversed(range(layers)):
        if not left():
            break
        trial_schedule = schedule.copy()
        trial_schedule[layer] += step
        trial = judge({"r": trial_schedule})
        if trial.accepted and trial.flops_cut > best.flops_cut:
            schedule, best = trial_schedule, trial
    return judge.result(best)


def prune_schedule(graph: ModelGraph, splits: QualitySplits, budget: float, context: PassContext, *,
                   max_trials: int = 8, progress: Callable[[str], None] = lambda _: None) -> Schedule:
    """The ``prune_tokens`` schedule cutting the most FLOPs within budget, from two shapes: d tokens dropped
    after each of layers 0..L−2 (progressive), or one cut after the middle layer (Zero-TPrune's single
    pruning layer); each shape gets half the trials."""
    judge = _Judge(graph, "prune_tokens", splits, budget, context, progress)
    seq, layers = _sequence_and_layers(graph)
    if layers < 2:
        return judge.result(None)

    def make(cut_layers: list[int]) -> Callable[[int], dict[str, Any]]:
        def knobs(drop: int) -> dict[str, Any]:
            # ``drop`` tokens after each cut layer, as the keep ratio of the tokens entering it (the pass keeps
            # ceil(ratio · n)), rounded down to 6 digits: ceil(ratio · n) stays n − drop, and names stay short.
            ratios = [math.floor((seq - drop * (k + 1)) / (seq - drop * k) * 1e6) / 1e6
                      for k in range(len(cut_layers))]
            return {"keep_ratio": ratios, "layers": cut_layers, "sim_fraction": 1.0, "merge": True}
        return knobs

    best = None
    shapes = [list(range(layers - 1))] + ([[layers // 2 - 1]] if layers > 2 else [])
    for i, cut_layers in enumerate(shapes):
        cap = len(judge.trials) + max_trials // len(shapes) + (max_trials % len(shapes) if i == 0 else 0)
        # At most half the tokens gone by the last cut.
        _, found = _largest_within(judge, make(cut_layers), 1, max(1, seq // (2 * len(cut_layers))),
                                   lambda: len(judge.trials) < cap)
        if found is not None and (best is None or found.flops_cut > best.flops_cut):
            best = found
    return judge.result(best)


SEARCHES = {"merge_tokens": merge_schedule, "prune_tokens": prune_schedule}


def budget_schedules(graph: ModelGraph, splits: QualitySplits, budget: float, context: PassContext,
                     passes: list[str], progress: Callable[[str], None] = lambda _: None,
                     max_trials: int | None = None) -> dict[str, Schedule]:
    """Each token pass in ``passes`` searched on ``graph`` (those without a schedule search are left out);
    ``max_trials`` caps every search's candidates (default: each search's own cap)."""
    cap = {} if max_trials is None else {"max_trials": max_trials}
    return {name: SEARCHES[name](graph, splits, budget, context, progress=progress, **cap)
            for name in passes if name in SEARCHES}
