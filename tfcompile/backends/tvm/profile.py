"""Where a TVM run spends its time, kernel by kernel, timed from the Relax VM's instrument hook.

This TVM build has no profiling VM (``relax.VirtualMachine(..., profile=True)``
is not compiled in), but every VM has ``set_instrument``: a callback the VM
calls before and after each packed function it invokes, with the function's
name and its arguments. Timing between the two calls gives each kernel's
wall time: the fused PrimFuncs TVM built (``fused_matmul_packed_add2``,
``layer_norm``, ...) and the VM's own builtins (``vm.builtin.alloc_tensor``,
...), which are time between kernels. A call into Python per kernel adds a
few microseconds to each, so shares are comparable and absolute times a
little high, as with ORT's profiler (``backends.ort_profile``).

A kernel's arguments are its inputs followed by its outputs (Relax calls
PrimFuncs in destination-passing style); the instrument cannot tell them
apart, so every argument's shape is recorded as an input and the last as
the output.
"""

from __future__ import annotations

import time

from tfcompile.backends.ort_profile import NodeTime, RunProfile, grouped_ms

BUILTIN_PREFIX = "vm.builtin."
_NORMS = ("layer_norm", "rms_norm", "group_norm")
_ACTIVATIONS = ("gelu", "silu", "sigmoid", "tanh", "erf")


def _shape(arg) -> tuple[int, ...] | None:
    shape = getattr(arg, "shape", None)
    try:
        return tuple(int(d) for d in shape) if shape is not None else None
    except TypeError:
        return None


def profile_runs(module, inputs: tuple, *, runs: int = 5) -> RunProfile:
    """Run ``module`` (a ``backends.tvm.TvmModule``) once to warm up and ``runs`` times more under the
    instrument; per kernel name, its mean milliseconds per run. ``run_ms``: the instrumented runs' mean."""
    vm = module.new_vm()
    main = vm["main"]
    args = module.to_tvm(inputs)
    main(*args)
    totals_s: dict[str, float] = {}
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    started: list[float] = []

    def instrument(_func, name, before_run, _ret, *call_args):
        if before_run:
            started.append(time.perf_counter())
            return 0
        totals_s[name] = totals_s.get(name, 0.0) + time.perf_counter() - started.pop()
        if name not in shapes:
            shapes[name] = tuple(s for s in map(_shape, call_args) if s is not None)
        return 0

    vm.set_instrument(instrument)
    begin = time.perf_counter()
    for _ in range(runs):
        main(*args)
    run_ms = (time.perf_counter() - begin) * 1e3 / runs
    nodes = tuple(NodeTime(name, "builtin" if name.startswith(BUILTIN_PREFIX) else "kernel",
                           seconds * 1e3 / runs, 0, shapes.get(name, ())[:-1], shapes.get(name, ())[-1:])
                  for name, seconds in totals_s.items())
    return RunProfile(nodes, run_ms)


def kernel_group(node: NodeTime, score_shapes: set[tuple[int, ...]]) -> str:
    """The group of ``cost_models.attribution.GROUPS`` a TVM kernel belongs to, read from the op names its
    fused PrimFunc's name joins and from its arguments' shapes (``score_shapes``: the softmax inputs')."""
    name = node.name
    if node.op_type == "builtin":
        return "between kernels"
    if "matmul" in name:
        # A weight matmul reads a constant that tfcompile's layout pass packed ("packed"), or a 2-D one; q·kᵀ
        # and p·v multiply two batched activations.
        weight = "packed" in name or any(len(shape) == 2 for shape in node.input_shapes[:2])
        return "weight matmuls" if weight else "attention"
    if "softmax" in name or score_shapes & set(node.input_shapes + node.output_shapes):
        return "attention"
    if any(norm in name for norm in _NORMS):
        return "norms"
    if any(activation in name for activation in _ACTIVATIONS):
        return "activations"
    return "other ops"


def ms_by_group(profile: RunProfile) -> dict[str, float]:
    """Milliseconds per run in each of ``cost_models.attribution.GROUPS``; the VM's builtins and the run's
    time outside every call count as between kernels."""
    return grouped_ms(profile, kernel_group, lambda node: "softmax" in node.name)
