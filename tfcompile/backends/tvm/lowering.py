"""ModelGraph -> Relax IRModule -> Relax VM executable.

The steps: re-export the variant with torch.export, import it with TVM's
torch frontend, canonicalise what TVM 0.27 lowers wrongly (below), legalise
and fuse, schedule every fused PrimFunc (``schedule``), then the VM lowering
passes and ``tvm.compile``. The pipeline is spelt out rather than taken from
``relax.get_pipeline("default")`` because that one neither fuses nor leaves a
place to schedule between fusion and codegen.

Canonicalisation: the torch frontend maps ``cumsum`` of a bool tensor to a
bool-typed Relax ``cumsum`` (torch returns int64), which LLVM codegen rejects
(integer add on i1) and which would be wrong even if it compiled; HF's causal
mask construction (GPT-2, Llama) does exactly that and then compares the
sums with ``equal``. Bool ``cumsum`` is rewritten to an int64 one, and any
comparison of bool tensors compares them as int8, which LLVM handles.
"""

from __future__ import annotations

from typing import Callable

import torch
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tfcompile.backends.tvm.native_log import filtered_stderr
from tfcompile.errors import BackendError, TraceError
from tfcompile.graph import ModelGraph, to_exported_program

_COMPARISONS = ("relax.equal", "relax.not_equal", "relax.less", "relax.less_equal", "relax.greater",
                "relax.greater_equal")


def one_line(exc: BaseException) -> str:
    """First meaningful line of a (possibly multi-line, traceback-bearing) TVM error."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # TVM puts its own traceback first and the message last.
    message = next((ln for ln in reversed(lines) if "Error" in ln or "Check failed" in ln), lines[-1] if lines else "")
    return f"{type(exc).__name__}: {message}"[:300]


def _dtype(expr: relax.Expr) -> str | None:
    # TVM 0.27 renamed StructInfo to Type: a Relax expression's type is ``expr.ty``.
    info = getattr(expr, "ty", None)
    return str(info.dtype) if isinstance(info, relax.TensorType) else None


@mutator
class _BoolCanonicaliser(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        name = call.op.name
        if name == "relax.cumsum" and _dtype(call.args[0]) == "bool":
            data = relax.op.astype(call.args[0], "int64")
            return relax.op.cumsum(data, axis=call.attrs.axis, dtype="int64", exclusive=call.attrs.exclusive)
        if name in _COMPARISONS and any(_dtype(a) == "bool" for a in call.args):
            args = [relax.op.astype(a, "int8") if _dtype(a) == "bool" else a for a in call.args]
            return relax.Call(call.op, args, call.attrs)
        return call


@tvm.transform.module_pass(opt_level=0, name="TfcompileCanonicaliseBool")
def canonicalise_bool(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            rewriter = _BoolCanonicaliser(mod)
            mod[gvar] = rewriter.visit_expr(func)
    return mod


def views_as_reshapes(program) -> None:
    """Turn every ``aten.view`` of ``program`` into ``aten.reshape``, in place.

    A traced ``view`` records that its input was contiguous *for the kernels
    that ran at trace time*. The Relax frontend re-runs the decompositions,
    and the CPU flash-attention decomposition returns its output in a
    [S, B, H, d] layout, so GPT-2's ``x.view(-1, d)`` after the heads are
    merged is no longer a legal view once the batch is larger than 1.
    ``reshape`` is the same function on values and views whenever it can.
    """
    aten = torch.ops.aten
    changed = False
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is aten.view.default:
            node.target = aten.reshape.default
            changed = True
    if changed:
        program.graph_module.recompile()


def import_graph(graph: ModelGraph) -> tvm.IRModule:
    """The variant as a Relax IRModule with weights bound as constants."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        program = to_exported_program(graph)
    except TraceError as exc:
        raise BackendError(f"tvm: {graph.name}: {exc}") from exc
    views_as_reshapes(program)
    try:
        mod = from_exported_program(program, keep_params_as_input=False)
        mod = canonicalise_bool(mod)
    except Exception as exc:  # the frontend raises assorted types for unsupported ops
        raise BackendError(f"tvm: {graph.name}: Relax import failed: {one_line(exc)}") from exc
    return mod


def fuse_passes() -> list[tvm.transform.Pass]:
    """Legalise to TIR and fuse: the module these produce is what the schedule step sees."""
    from tfcompile.backends.tvm import fast_math, index_guard, scatter

    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.DecomposeOpsForInference(),
        index_guard.guard_indices,
        relax.transform.LegalizeOps(customize_legalize_map={**fast_math.legalize_map(), **scatter.legalize_map()}),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def vm_passes() -> list[tvm.transform.Pass]:
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def legalize_and_fuse(mod: tvm.IRModule, target, *, pad_multiple: int | None = None) -> tvm.IRModule:
    """Legalise and fuse; ``pad_multiple`` pads constant matmul weights' N to that multiple first."""
    from tfcompile.backends.tvm.matmul_layout import pad_matmul_n
    from tfcompile.backends.tvm.patchify import patchify_conv

    prepare = [patchify_conv] + ([pad_matmul_n(pad_multiple)] if pad_multiple else [])
    with target, filtered_stderr():  # legalising an embedding lookup logs TVM's "Fast mode" warning
        return tvm.transform.Sequential(prepare + fuse_passes())(mod)


class Executable(tvm.runtime.Executable):
    """TVM's Relax executable, whose ``export_library`` keeps TVM's per-scope "Scope Saving" log lines
    out of the terminal (see ``native_log``)."""

    def export_library(self, file_name, **kwargs):
        with filtered_stderr():
            return super().export_library(file_name, **kwargs)


def build(mod: tvm.IRModule, target, schedule_pass: tvm.transform.Pass | None, *, name: str):
    """Schedule and compile an already fused module; returns the VM executable."""
    passes = ([schedule_pass] if schedule_pass is not None else []) + vm_passes()
    pipeline = tvm.transform.Sequential(passes)
    try:
        return Executable(tvm.compile(mod, target=target, relax_pipeline=pipeline).mod)
    except Exception as exc:
        raise BackendError(f"tvm: {name}: compile failed: {one_line(exc)}") from exc


def primfuncs(mod: tvm.IRModule) -> dict[str, "tvm.tirx.PrimFunc"]:
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def guarded(step: str, name: str, fn: Callable, *args, **kwargs):
    """Run a TVM step, turning any failure into a one-line BackendError."""
    try:
        return fn(*args, **kwargs)
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"tvm: {name}: {step} failed: {one_line(exc)}") from exc
