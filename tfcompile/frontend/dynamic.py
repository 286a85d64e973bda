"""Symbolic batch and sequence dimensions for the deployable export.

The graph passes and cost models see is traced at one static shape. A model
that serves requests of other sizes is traced again from its source module
with ``torch.export`` ``dynamic_shapes``; this module decides which input
dimensions may vary (``module_source``, ``program_source``), traces with them
(``trace_dynamic``) and makes inputs at any allowed shape from the example
inputs (``inputs_at``), so a check can run the model at shapes it was not
traced at.

The rule: dimension 0 of every input is the batch; dimension 1 of an integer
token input (``input_ids``, ``attention_mask``, ``token_type_ids``,
``position_ids``) is the sequence, at most the model's position table.
Images and other float inputs vary in batch only. A ``.pt2`` archive keeps
the dimensions it was exported with.
"""

from __future__ import annotations

import inspect

import torch

from tfcompile.errors import TraceError, first_line
from tfcompile.frontend import hf
from tfcompile.frontend.inputs import is_mask_name, seeded_generator
from tfcompile.graph import DimRange, ModelGraph, RetraceSource, from_exported_program

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
BATCH, SEQ = "batch", "seq"
# torch.export specialises a dimension whose example size is 0 or 1; traces use at least this.
MIN_TRACE_SIZE = 2


def module_source(module: torch.nn.Module, input_names: list[str], inputs: tuple[torch.Tensor, ...]) -> RetraceSource:
    """Batch on dim 0 of every input, sequence on dim 1 of integer token inputs (see the module docstring).

    The module's own ``input_names`` (a wrapped Hugging Face model's) win over the traced placeholders' names."""
    own = getattr(module, "input_names", None)
    input_names = list(own) if isinstance(own, (list, tuple)) and len(own) == len(inputs) else input_names
    inner = getattr(module, "model", None)
    seq_max = hf.max_positions(inner) if inner is not None else None
    dims = []
    for name, tensor in zip(input_names, inputs):
        if tensor.dim() == 0:
            dims.append({})
            continue
        spec = {0: DimRange(BATCH, 1, None)}
        if name in TOKEN_INPUTS and tensor.dim() >= 2 and not tensor.dtype.is_floating_point:
            spec[1] = DimRange(SEQ, 1, seq_max)
        dims.append(spec)
    return RetraceSource(module, tuple(dims))


def program_source(module: torch.nn.Module, program: torch.export.ExportedProgram, input_names: list[str],
                   what: str) -> RetraceSource:
    """The dimensions an exported program (``what``: a .pt2 archive, a converted TorchScript module)
    was exported with: its symbolic input dims and their ranges."""
    fakes = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    dims, names_of = [], {}
    for input_name in input_names:
        spec = {}
        for index, size in enumerate(getattr(fakes.get(input_name), "shape", ())):
            if isinstance(size, torch.SymInt) and size.node.expr.is_symbol:
                bounds = program.range_constraints.get(size.node.expr)
                low = _finite(bounds.lower if bounds is not None else None) or 1
                high = _finite(bounds.upper if bounds is not None else None)
                # Named like module_source's dims where the position says what they are, so checks find them.
                guess = BATCH if index == 0 else SEQ if index == 1 and input_name in TOKEN_INPUTS else None
                name = names_of.setdefault(str(size.node.expr), guess if guess and guess not in names_of.values()
                                           else f"dim{len(names_of)}")
                spec[index] = DimRange(name, max(low, 1), high)
        dims.append(spec)
    if not any(dims):
        return RetraceSource(None, static_reason=f"{what} has static input shapes (export it with "
                                                 "dynamic_shapes to deploy other shapes)")
    return RetraceSource(module, tuple(dims))


def _finite(bound) -> int | None:
    """A range bound as an int; None for an unbounded one (sympy and torch infinities)."""
    try:
        return int(bound) if bound is not None else None
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def export_dims(source: RetraceSource) -> tuple[dict[int, torch.export.Dim], ...]:
    """One ``{dim: torch.export.Dim}`` per input; equal names share one Dim."""
    made: dict[str, torch.export.Dim] = {}
    result = []
    for spec in source.dims:
        entry = {}
        for index, dim in spec.items():
            if dim.name not in made:
                kwargs = {"min": dim.min} if dim.max is None else {"min": dim.min, "max": dim.max}
                made[dim.name] = torch.export.Dim(dim.name, **kwargs)
            entry[index] = made[dim.name]
        result.append(entry)
    return tuple(result)


def trace_dynamic(graph: ModelGraph) -> ModelGraph:
    """``graph``'s source traced again with its symbolic dimensions (meta shapes are SymInts)."""
    source = graph.retrace
    inputs = trace_inputs(source, graph.input_names, graph.example_inputs)
    dims = export_dims(source)
    try:
        with torch.no_grad():
            program = torch.export.export(source.module.eval(), inputs, dynamic_shapes=_for_signature(
                source.module, dims), strict=False)
    except Exception as exc:  # torch raises many types, among them constraint violations
        raise TraceError(f"torch.export could not trace {graph.name} with symbolic "
                         f"{'/'.join(describe(source))}: {type(exc).__name__}: {first_line(exc)}") from exc
    return from_exported_program(program, inputs, name=graph.name, input_names=graph.input_names,
                                 output_names=graph.output_names, info=graph.info, retrace=source)


def _for_signature(module: torch.nn.Module, dims: tuple) -> tuple:
    """``forward(*tensors)`` takes its inputs as one nested tuple; named parameters take them flat."""
    params = list(inspect.signature(module.forward).parameters.values())
    if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return (dims,)
    return dims


def describe(source: RetraceSource) -> list[str]:
    """The symbolic dimensions in words, e.g. ['batch 1..', 'seq 1..1024']."""
    seen = {}
    for spec in source.dims:
        for dim in spec.values():
            seen.setdefault(dim.name, f"{dim.name} {dim.min}..{dim.max if dim.max is not None else ''}")
    return list(seen.values())


def sizes_in_range(source: RetraceSource, sizes: dict[str, int]) -> dict[str, int]:
    """``sizes`` (by dim name) clipped to each dimension's range; names the source lacks are dropped."""
    ranges = {dim.name: dim for spec in source.dims for dim in spec.values()}
    clipped = {}
    for name, size in sizes.items():
        if name in ranges:
            dim = ranges[name]
            clipped[name] = max(dim.min, min(size, dim.max if dim.max is not None else size))
    return clipped


def trace_inputs(source: RetraceSource, names: list[str], example: tuple[torch.Tensor, ...]) -> tuple:
    """The example inputs, widened to at least MIN_TRACE_SIZE along every symbolic dimension."""
    sizes = {}
    for spec, tensor in zip(source.dims, example):
        for index, dim in spec.items():
            sizes[dim.name] = max(sizes.get(dim.name, 0), tensor.shape[index])
    return inputs_at(source, names, example, {k: max(v, MIN_TRACE_SIZE) for k, v in sizes.items()})


def inputs_at(source: RetraceSource, names: list[str], example: tuple[torch.Tensor, ...], sizes: dict[str, int],
              seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs with each symbolic dimension at ``sizes[name]``, made from the example inputs.

    Masks are tiled (a padded row stays a padded row); other integer inputs draw
    their values from the example's own (token ids stay valid ids, token types
    stay valid types); float inputs are standard normal, as the frontend makes them.
    """
    generator = seeded_generator(seed)
    result = []
    for spec, name, tensor in zip(source.dims, names, example):
        shape = list(tensor.shape)
        for index, dim in spec.items():
            shape[index] = sizes.get(dim.name, shape[index])
        if list(tensor.shape) == shape:
            result.append(tensor)
        elif tensor.dtype.is_floating_point:
            result.append(torch.randn(shape, generator=generator).to(tensor.dtype))
        elif tensor.dtype == torch.bool or is_mask_name(name):
            result.append(_tiled(tensor, shape))
        else:
            values = tensor.reshape(-1)
            picks = torch.randint(0, values.numel(), shape, generator=generator)
            result.append(values[picks])
    return tuple(result)


def _tiled(tensor: torch.Tensor, shape: list[int]) -> torch.Tensor:
    repeats = [-(-want // have) for want, have in zip(shape, tensor.shape)]
    tiled = tensor.repeat(*repeats)
    return tiled[tuple(slice(0, n) for n in shape)].contiguous()
