"""The one IR: a torch.fx GraphModule produced by torch.export.

A ``ModelGraph`` holds the unlifted GraphModule of an ExportedProgram
(parameters as ``get_attr`` nodes, ATen ops before core decomposition, so
``aten.layer_norm``, ``aten.linear`` and ``aten.scaled_dot_product_attention``
stay single nodes) together with the seeded example inputs it was traced with.

Variants share parameter tensors with their original: ``clone`` copies the
graph, never the weights, and a pass that changes a weight registers a new
attribute instead of writing into the old tensor.

The graph is static: every node's meta shape is concrete, which the passes and
cost models rely on. What a deployable export with symbolic batch and sequence
dimensions needs to trace the model again rides along as ``retrace`` (a
``RetraceSource``; see ``frontend.dynamic`` and ``backends.dynamic_export``).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from tfcompile.errors import TraceError, first_line


@dataclasses.dataclass(frozen=True)
class DimRange:
    """A symbolic input dimension: its name in the exported model and its allowed range."""

    name: str
    min: int
    max: int | None  # None: no upper bound


@dataclasses.dataclass(frozen=True)
class RetraceSource:
    """The loaded module a static graph was traced from, and which input dimensions may vary.

    ``dims[i]`` maps input ``i``'s dimension index to its range; ``static_reason``
    says why the model can only be exported at its traced shape (then ``module`` is None).
    """

    module: torch.nn.Module | None
    dims: tuple[dict[int, DimRange], ...] = ()
    static_reason: str | None = None


@dataclasses.dataclass
class ModelGraph:
    name: str
    gm: torch.fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    # Free-form facts from the frontend (architecture family, config values).
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    # How to trace the source again with symbolic shapes; None: the frontend kept nothing.
    retrace: RetraceSource | None = None

    def nodes(self, op: str | None = None):
        return [n for n in self.gm.graph.nodes if op is None or n.op == op]

    def call_nodes(self):
        return [n for n in self.gm.graph.nodes if n.op == "call_function"]

    def run(self, inputs: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = self.gm(*(inputs if inputs is not None else self.example_inputs))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def parameter_bytes(self) -> int:
        seen, total = set(), 0
        for node in self.nodes("get_attr"):
            value = fetch_attr(self.gm, node.target)
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
        return total


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def clone(graph: ModelGraph, name: str | None = None) -> ModelGraph:
    """A new ModelGraph with a copied fx.Graph and shared parameter tensors."""
    with warnings.catch_warnings():
        # torch's own pytree specs warn about a deprecated isinstance check when copied.
        warnings.simplefilter("ignore", FutureWarning)
        new_graph = copy.deepcopy(graph.gm.graph)
    new_gm = torch.fx.GraphModule(graph.gm, new_graph)
    # Keep the pytree codegen so the module still takes and returns flat tuples.
    new_gm.meta.update(graph.gm.meta)
    return dataclasses.replace(graph, name=name or graph.name, gm=new_gm, info=dict(graph.info))


def export_module(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], *, name: str,
                  **names_and_info: Any) -> ModelGraph:
    """Trace ``module`` with torch.export and keep the unlifted GraphModule.

    ``names_and_info``: ``input_names``, ``output_names``, ``info``, as ``from_exported_program`` takes them."""
    module = module.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(module, tuple(example_inputs), strict=False)
    except Exception as exc:  # torch raises many unrelated types while tracing
        raise TraceError(f"torch.export could not trace {name}: {type(exc).__name__}: {first_line(exc)}") from exc
    return from_exported_program(program, example_inputs, name=name, **names_and_info)


def from_exported_program(
    program: torch.export.ExportedProgram,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    name: str,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    info: dict[str, Any] | None = None,
    retrace: RetraceSource | None = None,
) -> ModelGraph:
    gm = program.module()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if input_names is None:
        input_names = [p.name for p in placeholders]
    if output_names is None:
        output_node = next(n for n in gm.graph.nodes if n.op == "output")
        outs = output_node.args[0]
        count = len(outs) if isinstance(outs, (tuple, list)) else 1
        output_names = [f"output_{i}" for i in range(count)]
    return ModelGraph(name=name, gm=gm, example_inputs=tuple(example_inputs),
                      input_names=list(input_names), output_names=list(output_names),
                      info=dict(info or {}), retrace=retrace)


def refresh_shapes(graph: ModelGraph) -> None:
    """Recompute every node's ``meta['val']`` fake tensor after a rewrite."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(t) for t in graph.example_inputs]
    with torch.no_grad():
        FakeTensorProp(graph.gm, mode).propagate_dont_convert_inputs(*fake_inputs)


def to_exported_program(graph: ModelGraph, dynamic_shapes: tuple | None = None) -> torch.export.ExportedProgram:
    """Re-export a (rewritten) graph so backends get a fresh ExportedProgram.

    ``dynamic_shapes``: one ``{dim: torch.export.Dim}`` per input (the GraphModule takes flat inputs)."""
    try:
        with torch.no_grad():
            return torch.export.export(graph.gm, tuple(graph.example_inputs), dynamic_shapes=dynamic_shapes,
                                       strict=False)
    except Exception as exc:
        raise TraceError(f"could not re-export variant {graph.name}: {type(exc).__name__}: {first_line(exc)}") from exc
