"""Measuring variants on a real runtime: here (ORT, TVM, torch) or on a remote device (TVM RPC).

One place for both, used by ``optimize``, ``compare`` and the benchmarks.
Every lowered or remote output is checked against torch before its timing
counts, with one tolerance (``OUTPUT_TOLERANCE``; torch at a lower precision:
that precision's, ``torch_device.TOLERANCE``): a backend that computes
something else has no latency worth reporting.

Local variants of one shape are timed round-robin (``measure_interleaved``),
so a slow spell of the machine hits all of them alike. Remote variants are
timed in parallel over the tracker's servers, each holding one server for its
whole timing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from tfcompile.backends.runner import Lowered, interleave_block, lower_for_inputs
from tfcompile.backends.timing import Measurement, measure, measure_interleaved
from tfcompile.errors import BackendError, InvalidOptionError
from tfcompile.graph import ModelGraph
from tfcompile.structure.precision import RELATIVE_TOLERANCE, graph_precision
from tfcompile.verify import compare_outputs

# A backend's output that moves more than this (relative to the largest output
# magnitude) from torch's is a lowering bug, not a faster variant.
OUTPUT_TOLERANCE = 1e-4
# torch's device, mode and precision when not asked for: the GraphModule as it is, eager, on cpu, in fp32.
TORCH_DEFAULTS = {"device": "cpu", "mode": "eager", "precision": "fp32"}

Progress = Callable[[str], None]


@dataclasses.dataclass
class Timed:
    measurement: Measurement
    runtime: str  # "ort", "tvm", "torch", or the remote device's label
    notes: list[str] = dataclasses.field(default_factory=list)
    onnx_path: Path | None = None  # the ORT export, kept for the caller when asked


def require_measurable(target_name: str, remote=None, on_cuda: bool = False) -> None:
    """Refuse to measure a target that is not this host, unless the run reaches it (``--remote``, or a GPU
    target with the torch backend on cuda): timings from this CPU must never rank another device's variants."""
    if target_name == "cpu" or remote is not None or on_cuda:
        return
    raise InvalidOptionError(f"measuring on {target_name} needs that device; only 'cpu' (this host) is measured "
                             "here, or the device itself through a TVM RPC tracker (--remote HOST:PORT --device-key "
                             "KEY); leave out --measure to rank by the prediction")


def check_outputs(name: str, graph: ModelGraph, outputs, what: str, tolerance: float = OUTPUT_TOLERANCE) -> None:
    """``what``: whose outputs these are, e.g. "ort output" or "output on rk3588"."""
    check = compare_outputs(graph.run(), outputs, graph.output_names)
    if not check.max_rel_err <= tolerance:
        raise BackendError(f"{name}: {what} differs from torch by {check.max_rel_err:.1e} relative "
                           f"(tolerance {tolerance:.0e})")


def measure_here(graphs: dict[str, ModelGraph], backend: str, workdir: Path, *, repeat: int,
                 keep_files: bool = False, progress: Progress = lambda _: None,
                 max_total_s: float | None = None, device: str = "cpu", mode: str = "eager",
                 precision: str = "fp32") -> dict[str, Timed]:
    """Lower every graph on ``backend``, check it, and time them round-robin (one alone: by itself).

    Graphs that share a GraphModule (one variant fed several batches of a workload) are lowered once.
    ``max_total_s``: stop timing once this much is spent (after at least 3 runs each).
    ``device``/``mode``/``precision``: backend torch only; other than cpu/eager/fp32 the graphs are lowered
    by ``torch_device.lower_device`` (``lower_torch_device``), their outputs checked at the precision's
    tolerance and timed by ``torch_device.measure_device`` (CUDA events on cuda).
    """
    torch_options = {"device": device, "mode": mode, "precision": precision}
    on_device = torch_options != TORCH_DEFAULTS
    if on_device and backend != "torch":
        raise BackendError(f"device {device}, mode {mode}, precision {precision}: only for backend torch, "
                           f"not {backend}")
    lowered: dict[str, Lowered] = {}
    sharing: dict[int, list[str]] = {}
    for name, graph in graphs.items():
        sharing.setdefault(id(graph.gm), []).append(name)
    for names in sharing.values():
        progress(f"lowering {names[0]} for {backend}")
        input_sets = [graphs[n].example_inputs for n in names]
        runs = lower_torch_device(graphs[names[0]], input_sets, **torch_options) if on_device else \
            lower_for_inputs(graphs[names[0]], backend, workdir, input_sets)
        for name, low in zip(names, runs):
            # A precision variant is held to its own precision's tolerance (it runs its dtype in both).
            own = RELATIVE_TOLERANCE[graph_precision(graphs[name])]
            check_outputs(name, graphs[name], low.outputs, f"{getattr(low, 'label', backend)} output",
                          max(getattr(low, "tolerance", OUTPUT_TOLERANCE), own))
            lowered[name] = low
    progress(f"measuring {len(lowered)} variant(s) on {backend} (median of {repeat})")
    if on_device:
        from tfcompile.backends.torch_device import measure_device

        results = measure_device(lowered, warmup=2, repeat=repeat,
                                 max_total_s=30.0 if max_total_s is None and len(lowered) == 1 else max_total_s)
    elif len(lowered) == 1:
        ((name, low),) = lowered.items()
        results = {name: measure(low.run, backend=backend, warmup=2, repeat=repeat,
                                 max_total_s=30.0 if max_total_s is None else max_total_s)}
    else:
        results = measure_interleaved({n: low.run for n, low in lowered.items()}, backend=backend,
                                      repeat=repeat, block=interleave_block(backend), max_total_s=max_total_s)
    timed = {}
    for name, low in lowered.items():
        if not keep_files:
            low.remove_files()
        # "torch cuda graphs fp32" when torch_device ran it: the runtime, where and how, as reports name it.
        timed[name] = Timed(results[name], getattr(low, "label", backend), list(low.notes),
                            low.onnx_path if keep_files else None)
    return timed


def lower_torch_device(graph: ModelGraph, input_sets: list, *, device: str, mode: str, precision: str) -> list:
    """``runner.lower_for_inputs`` for torch on ``device`` in ``mode`` at ``precision``: a
    ``torch_device.DeviceLowered`` per input set, each checked against ``graph.run`` on its set (cpu fp32) at
    the precision's tolerance. The cast graph is made once; ``compile`` compiles per set.

    Here rather than in runner: torch_device builds on runner's ``Lowered``, so runner cannot import it."""
    from tfcompile.backends.torch_device import cast_graph, lower_device

    cast = cast_graph(graph, precision)
    return [lower_device(graph, device=device, mode=mode, precision=precision, cast=cast, inputs=inputs,
                         reference=graph.run(inputs)) for inputs in input_sets]


def measure_remote(graphs: dict[str, ModelGraph], remote, target_name: str, *, repeat: int,
                   progress: Progress = lambda _: None) -> dict[str, Timed]:
    """Compile for the remote device's target here, time on the device through its TVM RPC tracker, check."""
    from tfcompile.backends.tvm.remote import measure_many, remote_target

    target, cross_compiler = remote_target(target_name)
    results = measure_many(graphs, remote, repeat=repeat, target=target, cross_compiler=cross_compiler,
                           progress=progress)
    timed = {}
    for name, graph in graphs.items():
        check_outputs(name, graph, results[name].outputs, f"output on {remote.label}")
        timed[name] = Timed(results[name].measurement, remote.label)
    return timed
