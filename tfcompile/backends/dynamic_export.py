"""The deployable ONNX file: symbolic batch and sequence where the variant allows.

Passes and cost models work on a graph traced at one shape; a model exported
from it runs only at that shape. ``export_deployable_onnx`` traces the
model's source again with symbolic dimensions (``frontend.dynamic``), replays
the variant's passes on that graph (``backends.replay``), exports it, and runs
the file in ONNX Runtime against the torch source at several shapes (the
traced one, the smallest, an odd one, a large one); only a file within
``REL_TOLERANCE`` at every one is written. A precision variant (int8, fp16,
bf16) is checked against the replayed variant itself, within its precision's
tolerance: its rounding does not depend on the shape. A variant that is
otherwise approximate or shape-specialised (token pruning, padding removal for
fixed lengths), a source that cannot be traced again (an ONNX input) or a
replay or check that fails gives the static export instead, with the reason
in the result.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from tfcompile.backends import ort
from tfcompile.backends.replay import replay
from tfcompile.errors import BackendError, TfcompileError, first_line
from tfcompile.frontend.dynamic import describe, export_dims, inputs_at, sizes_in_range, trace_dynamic
from tfcompile.graph import ModelGraph
from tfcompile.structure.precision import RELATIVE_TOLERANCE, graph_precision
from tfcompile.passes import PassContext, Stage, get_pass
from tfcompile.verify import compare_outputs

REL_TOLERANCE = RELATIVE_TOLERANCE["fp32"]
# Checked besides the traced shape: the smallest, an odd one, a wide batch, a long sequence
# (each clipped to the model's range; the long one is capped so a check stays seconds, not minutes).
CHECK_SIZES = ({"batch": 1, "seq": 1}, {"batch": 3, "seq": 77}, {"batch": 16, "seq": 16}, {"batch": 2, "seq": 512})
SHAPE_SPECIALISED_STAGES = (Stage.TOKENS, Stage.PADDING)


@dataclasses.dataclass(frozen=True)
class ShapeCheck:
    """ONNX Runtime against torch at one shape: each input's shape, the errors and the quality figure."""

    shapes: tuple[tuple[int, ...], ...]
    max_rel_err: float
    max_abs_err: float
    quality: float
    quality_metric: str

    def label(self) -> str:
        return "x".join(str(d) for d in self.shapes[0]) if self.shapes else "()"


@dataclasses.dataclass(frozen=True)
class DeployedOnnx:
    path: Path
    dims: tuple[str, ...]  # the symbolic dimensions in words, e.g. ("batch 1..", "seq 1..1024"); () when static
    static_reason: str | None  # why the file is fixed to the traced shape; None when it is not
    checks: tuple[ShapeCheck, ...]

    @property
    def dynamic(self) -> bool:
        return self.static_reason is None

    @property
    def max_rel_err(self) -> float:
        return max(c.max_rel_err for c in self.checks)

    def summary(self) -> list[str]:
        """Lines for the user: the input shapes the file takes, the shapes it was checked at, where it is."""
        if self.dynamic:
            shapes = f"input shapes: symbolic {', '.join(self.dims)}"
        else:
            shapes = f"input shapes: static, {_shapes(self.checks[0].shapes)} ({self.static_reason})"
        checked = ", ".join(c.label() for c in self.checks)
        return [shapes, f"ONNX Runtime vs torch at {checked}: max relative error {self.max_rel_err:.1e}",
                f"wrote {self.path}"]


def _shapes(shapes) -> str:
    return ", ".join("x".join(map(str, s)) for s in shapes)


def export_variant_onnx(variant: Any, path: Path, *, original: ModelGraph | None = None,
                        context: PassContext | None = None, opset: int | None = None,
                        atol: float | None = None) -> DeployedOnnx:
    """``export_deployable_onnx`` for a ``variants.Variant`` (its graph, its pipeline with knobs, what applied)."""
    spec = variant.spec
    passes = [(name, dict(spec.knobs.get(name, {}))) for name in spec.passes]
    return export_deployable_onnx(variant.graph, path, passes=passes, applied=variant.applied_passes,
                                  original=original, context=context, opset=opset, atol=atol)


def export_deployable_onnx(graph: ModelGraph, path: Path, *, passes: Sequence[tuple[str, dict[str, Any]]] = (),
                           applied: Sequence[str] | None = None, original: ModelGraph | None = None,
                           context: PassContext | None = None, opset: int | None = None,
                           atol: float | None = None) -> DeployedOnnx:
    """Write ``graph`` (the result of ``passes`` on ``original``) to ``path`` as checked ONNX.

    ``passes``: (name, knobs) in order, as the variant ran them; ``applied``: the
    ones that applied (default: all). ``original``: the reference at the traced
    shape (default ``graph``; an approximate variant is checked against itself).
    Raises ``BackendError`` when even the static file does not match torch.
    ``opset``: the ONNX opset (default: the exporter's). ``atol``: the largest
    absolute difference from torch allowed at every checked shape, instead of
    ``REL_TOLERANCE`` relative to the largest output magnitude.
    """
    path = Path(path)
    applied = list(applied if applied is not None else [name for name, _ in passes])
    reason = static_reason(graph, applied)
    with tempfile.TemporaryDirectory(prefix=".tfcompile-export-") as workdir:
        if reason is None:
            try:
                dims, checks = _dynamic_file(graph, passes, applied, original or graph, context,
                                             Path(workdir) / "dynamic.onnx", opset=opset, atol=atol)
                ort.single_file(Path(workdir) / "dynamic.onnx", path)
                return DeployedOnnx(path, dims, None, checks)
            except TfcompileError as exc:
                reason = str(exc)
        static = ort.export_onnx(graph, Path(workdir) / "static.onnx", external_data=True, opset=opset)
        # An approximate variant differs from the original by design: the file must reproduce the variant.
        reference = (original or graph) if all(get_pass(name).exact for name in applied) else graph
        # Padding passes leave zeros at padded positions, where the padded original computed meaningless
        # values: like verify, compare the valid positions of the traced batch's lengths.
        padded = any(get_pass(name).stage is Stage.PADDING for name in applied)
        lengths = context.workload.lengths if padded and context is not None else None
        checks = (_check(static, graph.example_inputs, reference.run(graph.example_inputs), graph.output_names,
                         lengths=lengths),)
        _require_close(graph, checks[0], atol)
        ort.single_file(static, path)
        return DeployedOnnx(path, (), reason, checks)


def static_reason(graph: ModelGraph, applied: list[str]) -> str | None:
    """Why this variant can only be exported at its traced shape, before trying anything."""
    source = graph.retrace
    if source is None:
        return "the loader kept no source to trace again"
    if source.static_reason:
        return source.static_reason
    if not any(source.dims):
        return "no input has a batch or sequence dimension"
    for name in applied:
        pass_ = get_pass(name)
        if not pass_.exact and pass_.stage is not Stage.PRECISION:  # a dtype's rounding is the same at any shape
            return f"approximate pass {name} was judged at the traced shape only"
        if pass_.lengths_specific:
            return f"pass {name} is specialised to the traced batch's shape and valid lengths"
        if pass_.stage is Stage.PADDING:
            return f"pass {name} is written for the traced [batch, seq]; it serves any valid lengths at that shape"
        if pass_.stage in SHAPE_SPECIALISED_STAGES:
            return f"pass {name} specialises the graph to the traced shape ({pass_.stage.name.lower()})"
    return None


def _dynamic_file(graph: ModelGraph, passes, applied: list[str], original: ModelGraph,
                  context: PassContext | None, path: Path, *, opset: int | None = None,
                  atol: float | None = None) -> tuple[tuple[str, ...], tuple[ShapeCheck, ...]]:
    """Trace, replay, export and check the symbolic file; any failure is a TfcompileError naming the step."""
    source = graph.retrace
    dynamic = trace_dynamic(graph)
    try:
        dynamic, outcomes = replay(dynamic, passes, context)
    except TfcompileError:
        raise
    except Exception as exc:  # a pass that assumes concrete shapes fails in its own way
        raise BackendError(f"the passes fail on symbolic shapes: {type(exc).__name__}: {first_line(exc)}") from exc
    replayed = [o.name for o in outcomes if o.applied]
    if replayed != applied:
        differ = next(o for o in outcomes if (o.name in applied) != o.applied)
        raise BackendError(f"pass {differ.name} {'applies only' if differ.applied else 'does not apply'} with "
                           f"symbolic shapes ({differ.reason})")
    ort.export_onnx(dynamic, path, external_data=True, dynamic_shapes=export_dims(source), opset=opset)
    model = ort.OrtModel(path)
    # An approximate (precision) variant differs from the original by design: the file must reproduce the
    # variant, so the reference at every shape is the replayed variant run in torch.
    approximate = not all(get_pass(name).exact for name in applied)
    traced_reference = (graph if approximate else original).run(graph.example_inputs)
    checks = [_check(model, graph.example_inputs, traced_reference, graph.output_names)]
    seen = {tuple(tuple(t.shape) for t in graph.example_inputs)}
    for sizes in CHECK_SIZES:
        inputs = inputs_at(source, graph.input_names, graph.example_inputs, sizes_in_range(source, sizes))
        if tuple(tuple(t.shape) for t in inputs) in seen:
            continue
        seen.add(tuple(tuple(t.shape) for t in inputs))
        try:
            with torch.no_grad():
                reference = dynamic.gm(*inputs) if approximate else source.module(*inputs)
        except Exception as exc:  # the model's own code refuses the shape
            raise BackendError(f"torch cannot run {graph.name} at {_shapes(t.shape for t in inputs)}: "
                               f"{type(exc).__name__}: {first_line(exc)}") from exc
        reference = reference if isinstance(reference, (tuple, list)) else (reference,)
        checks.append(_check(model, inputs, reference, graph.output_names))
        _require_close(graph, checks[-1], atol)
    _require_close(graph, checks[0], atol)
    return tuple(describe(source)), tuple(checks)


def _check(model: ort.OrtModel | Path, inputs: tuple[torch.Tensor, ...], reference: tuple,
           output_names: list[str], lengths: tuple[int, ...] | None = None) -> ShapeCheck:
    model = model if isinstance(model, ort.OrtModel) else ort.OrtModel(model)
    try:
        outputs = model.run(inputs)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
        raise BackendError(f"ONNX Runtime fails at input shapes {shapes}: {first_line(exc)}") from exc
    try:
        result = compare_outputs(tuple(reference), outputs, output_names, lengths=list(lengths) if lengths else None)
    except ValueError as exc:  # output count or shape differs
        raise BackendError(f"ONNX Runtime's outputs do not match torch's: {exc}") from exc
    return ShapeCheck(tuple(tuple(t.shape) for t in inputs), result.max_rel_err, result.max_abs_err,
                      result.quality, result.quality_metric)


def _require_close(graph: ModelGraph, check: ShapeCheck, atol: float | None = None) -> None:
    """ONNX Runtime's output against torch's within ``atol``, or within the graph's precision's tolerance
    (``REL_TOLERANCE`` for fp32) relative to the largest output magnitude."""
    name = graph.name
    if atol is not None:
        if not check.max_abs_err <= atol:
            raise BackendError(f"ONNX Runtime differs from torch for {name} at input shape {check.label()}: max "
                               f"absolute error {check.max_abs_err:.1e} > --atol {atol:.0e}")
        return
    precision = graph_precision(graph)
    tolerance = RELATIVE_TOLERANCE[precision]
    if not check.max_rel_err <= tolerance:
        raise BackendError(f"ONNX Runtime differs from torch for {name} at input shape {check.label()}: max "
                           f"relative error {check.max_rel_err:.1e} > {tolerance:.0e} ({precision})")
