"""The pass contract and the registry.

A pass has a name, an exactness, ``check(graph) -> reason | None`` (None means
it applies) and ``run(graph, **knobs) -> PassResult``. ``run`` receives a clone
and may rewrite it; the caller's graph is never touched (see ``apply_pass``).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable

from tfcompile.errors import UnknownPassError
from tfcompile.graph import ModelGraph, clone, refresh_shapes


class Exactness(enum.Enum):
    EXACT = "exact"  # same function up to float rounding
    APPROXIMATE = "approximate"  # the function changes; a quality figure is reported


@dataclasses.dataclass(frozen=True)
class PassResult:
    graph: ModelGraph
    changed: bool
    summary: str  # what was rewritten, e.g. "merged 12 q/k/v triples"


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    exactness: Exactness
    description: str
    check: Callable[[ModelGraph], str | None]
    run: Callable[..., PassResult]

    @property
    def exact(self) -> bool:
        return self.exactness is Exactness.EXACT


_REGISTRY: dict[str, Pass] = {}


def register_pass(name: str, exactness: Exactness, description: str, check: Callable[[ModelGraph], str | None]):
    """Decorator for a pass's run function."""

    def wrap(run: Callable[..., PassResult]) -> Callable[..., PassResult]:
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} registered twice")
        _REGISTRY[name] = Pass(name, exactness, description, check, run)
        return run

    return wrap


def get_pass(name: str) -> Pass:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownPassError(f"unknown pass {name!r}; known passes: {known}") from None


def all_passes() -> list[Pass]:
    return [(_REGISTRY[k]) for k in sorted(_REGISTRY)]


@dataclasses.dataclass(frozen=True)
class PassOutcome:
    name: str
    applied: bool
    reason: str  # the rewrite summary when applied, the refusal otherwise


def apply_pass(graph: ModelGraph, name: str, **knobs: Any) -> tuple[ModelGraph, PassOutcome]:
    """Run one pass on a clone of ``graph``; return the new graph and what happened."""
    pass_ = get_pass(name)
    reason = pass_.check(graph)
    if reason is not None:
        return graph, PassOutcome(name, False, reason)
    result = pass_.run(clone(graph), **knobs)
    if result.changed:
        result.graph.gm.graph.lint()
        result.graph.gm.recompile()
        refresh_shapes(result.graph)
    return result.graph, PassOutcome(name, result.changed, result.summary)
