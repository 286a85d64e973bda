"""The pass contract and the registry.

A pass is a name, an exactness, a description and two functions:

- ``plan(graph, context, **knobs) -> plan``: reads the graph (never edits it)
  and either returns what to rewrite or raises ``PassRefused(reason)``. Knob
  values that make no sense are ``ValueError``s, not refusals.
- ``rewrite(graph, plan) -> PassResult``: edits the graph it is handed, which
  ``apply_pass`` cloned once, following the plan; it does not refuse.

Planning and rewriting see the same clone, so a plan may hold that clone's
nodes. A pass may declare ``runs_after``: passes that, when both appear in a
pipeline, must come first (as torch.fx's pass manager takes constraints); the
search order is derived from these declarations.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable

from tfcompile.errors import TfcompileError, UnknownPassError
from tfcompile.graph import ModelGraph, clone, refresh_shapes
from tfcompile.passes.context import PassContext, default_context


class Exactness(enum.Enum):
    EXACT = "exact"  # same function up to float rounding
    APPROXIMATE = "approximate"  # the function changes; a quality figure is reported


class Stage(enum.IntEnum):
    """What a pass rewrites; pipelines run the stages in this order (clean-up first, precision last)."""

    CLEANUP = 0
    PROJECTIONS = 1
    NORMS = 2
    FFN = 3
    ATTENTION = 4
    TOKENS = 5  # drop or merge tokens: every later token-wise op sees fewer
    PADDING = 6  # specialises to the batch's lengths, so it sees the final graph
    PRECISION = 7  # narrows the dtype of whatever the structural passes left


class PassRefused(Exception):
    """The pass does not apply to this graph; the message says why."""

    @property
    def reason(self) -> str:
        return str(self)


def found_or_refuse(found, reason: str):
    """``found`` when it is not empty; otherwise the pass refuses with ``reason``."""
    if not found:
        raise PassRefused(reason)
    return found


@dataclasses.dataclass(frozen=True)
class PassResult:
    graph: ModelGraph
    changed: bool
    summary: str  # what was rewritten, e.g. "merged 12 q/k/v triples"
    # What the rewrite did, for reports and tests (e.g. tokens per layer); typed by each pass.
    record: Any = None


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    exactness: Exactness
    description: str
    plan: Callable[..., Any]
    rewrite: Callable[[ModelGraph, Any], PassResult]
    stage: Stage
    runs_after: tuple[str, ...] = ()
    # The rewrite bakes the example batch's valid lengths into the graph: the variant is right for
    # batches with exactly those lengths and silently wrong for others, so it serves no workload
    # whose batches differ (and is never exported as a general model).
    lengths_specific: bool = False

    @property
    def exact(self) -> bool:
        return self.exactness is Exactness.EXACT

    def check(self, graph: ModelGraph, context: PassContext | None = None, **knobs: Any) -> str | None:
        """Why the pass does not apply to ``graph`` (None if it does)."""
        try:
            self.plan(graph, context or default_context(), **knobs)
        except PassRefused as refusal:
            return refusal.reason
        return None


_REGISTRY: dict[str, Pass] = {}


def register_pass(name: str, exactness: Exactness, description: str, *, plan: Callable[..., Any],
                  stage: Stage, runs_after: tuple[str, ...] = (), lengths_specific: bool = False):
    """Decorator for a pass's rewrite function; ``plan`` decides whether and what to rewrite."""

    def wrap(rewrite: Callable[[ModelGraph, Any], PassResult]) -> Callable[[ModelGraph, Any], PassResult]:
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} registered twice")
        _REGISTRY[name] = Pass(name, exactness, description, plan, rewrite, stage, tuple(runs_after),
                               lengths_specific)
        return rewrite

    return wrap


def get_pass(name: str) -> Pass:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownPassError(f"unknown pass {name!r}; known passes: {known}") from None


def all_passes() -> list[Pass]:
    return [(_REGISTRY[k]) for k in sorted(_REGISTRY)]


def pass_order(names: list[str] | None = None) -> list[str]:
    """``names`` (default: every pass) ordered by stage, each after what it ``runs_after``.

    Ties within a stage keep alphabetical order, so the order is the same on every run.
    """
    names = sorted(_REGISTRY) if names is None else list(names)
    wanted = set(names)
    before = {n: {p for p in get_pass(n).runs_after if p in wanted} for n in names}
    ordered: list[str] = []
    while before:
        ready = sorted((n for n, deps in before.items() if not deps), key=lambda n: (get_pass(n).stage, n))
        if not ready:
            raise ValueError(f"passes' runs_after constraints form a cycle among {sorted(before)}")
        ordered.append(ready[0])
        del before[ready[0]]
        for deps in before.values():
            deps.discard(ready[0])
    return ordered


def check_pipeline(names: list[str] | tuple[str, ...]) -> None:
    """Refuse a pipeline that names a pass twice or runs a pass before one it must follow."""
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:
        # A second run finds nothing its first run left to do, or rewrites its own rewrite.
        raise TfcompileError(f"--passes names {twice} twice; a pass runs once in a pipeline")
    for i, name in enumerate(names):
        for later in names[i + 1:]:
            if later in get_pass(name).runs_after:
                raise TfcompileError(f"pipeline order: {name} must run after {later} (swap them)")


@dataclasses.dataclass(frozen=True)
class PassOutcome:
    name: str
    applied: bool
    reason: str  # the rewrite summary when applied, the refusal otherwise
    record: Any = None


def apply_pass(graph: ModelGraph, name: str, context: PassContext | None = None,
               **knobs: Any) -> tuple[ModelGraph, PassOutcome]:
    """Plan ``name`` on a clone of ``graph`` and rewrite that clone; ``graph`` itself is never touched.

    A refused pass hands back ``graph`` itself with the reason.
    """
    pass_ = get_pass(name)
    work = clone(graph)
    try:
        plan = pass_.plan(work, context or default_context(), **knobs)
    except PassRefused as refusal:
        return graph, PassOutcome(name, False, refusal.reason)
    result = pass_.rewrite(work, plan)
    if not result.changed:
        return graph, PassOutcome(name, False, result.summary)
    result.graph.gm.graph.lint()
    result.graph.gm.recompile()
    refresh_shapes(result.graph)
    return result.graph, PassOutcome(name, True, result.summary, result.record)
