"""Replay a variant's passes on a graph traced with symbolic shapes.

The pass kit counts ops that read only a tensor's shape (``SHAPE_ONLY_OPS``:
``sym_size``, ``ones_like``, ...) as constants, which they are in a static
graph. With symbolic dimensions they change per request, and folding one
(``fold_constants`` precomputes position ids and causal masks built from
``arange(seq)``) would bake the traced size into the model. For the replay,
every such node whose result is symbolic calls an opaque stand-in instead, so
each pass sees it as input-dependent; the stand-ins are swapped back after.

A replay is faithful when the same passes apply as on the static graph; the
caller (``dynamic_export``) keeps the export static when it is not.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from tfcompile.graph import ModelGraph, clone
from tfcompile.passes import PassContext, PassOutcome, apply_pass
from tfcompile.structure import SHAPE_ONLY_OPS


def _stand_in(op: Callable) -> Callable:
    def call(*args, **kwargs):
        return op(*args, **kwargs)

    call.__name__ = call.__qualname__ = "symbolic_" + str(op).replace(".", "_")
    return call


_STAND_INS = {op: _stand_in(op) for op in SHAPE_ONLY_OPS}
_ORIGINALS = {stand_in: op for op, stand_in in _STAND_INS.items()}


def _opaque(op: Callable) -> Callable:
    """The stand-in for ``op``, made once per op."""
    if op not in _STAND_INS:
        _STAND_INS[op] = _stand_in(op)
        _ORIGINALS[_STAND_INS[op]] = op
    return _STAND_INS[op]


def is_symbolic(value: Any) -> bool:
    """A SymInt without a fixed value, or a tensor with such a dimension."""
    if isinstance(value, torch.SymInt):
        return value.node.maybe_as_int() is None
    if isinstance(value, torch.Tensor):
        return any(is_symbolic(d) for d in value.shape)
    return False


def replay(graph: ModelGraph, passes: Sequence[tuple[str, dict[str, Any]]],
           context: PassContext | None = None) -> tuple[ModelGraph, list[PassOutcome]]:
    """``graph`` (symbolic) with ``passes`` (name, knobs) applied in order, shape reads kept symbolic."""
    work = clone(graph)
    _swap(work, _symbolic_constant_stand_in(work))
    outcomes = []
    for name, knobs in passes:
        work, outcome = apply_pass(work, name, context, **knobs)
        outcomes.append(outcome)
    _swap(work, lambda node: _ORIGINALS.get(node.target))
    return work, outcomes


def _symbolic_constant_stand_in(graph: ModelGraph) -> Callable[[torch.fx.Node], Callable | None]:
    """Shape reads with a symbolic result, and any op computed only from weights and symbolic sizes
    given as literals (``full([s0, s1])``, ``expand(weight, [s0, ...])``): what a constant folder would
    otherwise try to evaluate, and fail on or bake the traced size into."""
    from_constants: set[torch.fx.Node] = set()
    for node in graph.gm.graph.nodes:
        if node.op == "get_attr":
            from_constants.add(node)
        elif node.op == "call_function" and all(arg in from_constants for arg in node.all_input_nodes):
            from_constants.add(node)

    def stand_in(node: torch.fx.Node) -> Callable | None:
        if not is_symbolic(node.meta.get("val")) or not callable(node.target):
            return None
        if node.target in SHAPE_ONLY_OPS or node in from_constants:
            return _opaque(node.target)
        return None

    return stand_in


def _swap(graph: ModelGraph, replacement: Callable[[torch.fx.Node], Callable | None]) -> None:
    for node in graph.call_nodes():
        new = replacement(node)
        if new is not None:
            node.target = new
    graph.gm.recompile()
