"""TVM Relax backend: compile a ModelGraph for this CPU and run or time it.

``compile_graph`` lowers a variant (see ``lowering``) and schedules its fused
kernels before codegen, because TVM 0.27's CPU pipeline applies no schedule
at all and its naive loops are two orders of magnitude slower than ONNX
Runtime. ``schedule`` picks how:

- ``"none"``: TVM's unscheduled loops (the reference for what scheduling buys);
- ``"rules"``: tfcompile's own schedule rules (``rules``), no tuning;
- ``"tuned"``: MetaSchedule records from a database directory where present,
  the rules elsewhere (``tuning``);
- ``"auto"`` (the default): ``"tuned"`` when the target's tuning database
  exists (``tfcompile tune`` wrote one), else ``"rules"``. The module records
  which kernels came from records, which from rules, and which ran untuned.

Threads: TVM sizes its thread pool once, from ``TVM_NUM_THREADS``, and its
default on this kind of machine is half the cores; importing this module sets
the variable to the cores this process may use unless the user set it, and
``set_num_threads`` can lower the count later. Workers stay pinned to cores
(TVM's default, ``TVM_BIND_THREADS``): unpinned, ``benchmarks/tvm_thread_binding.py``
timed no round at twice the fastest where pinned ones had some, but session 20's
accuracy runs measured vit-base b1 about 20 % slower unpinned (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch

from tfcompile.backends.timing import Measurement, measure
from tfcompile.backends.tvm.target import host_cores, host_target, vector_lanes
from tfcompile.errors import BackendError
from tfcompile.graph import ModelGraph

os.environ.setdefault("TVM_NUM_THREADS", str(host_cores()))

SCHEDULES = ("none", "rules", "tuned", "auto")

__all__ = ["SCHEDULES", "TvmModule", "compile_graph", "host_target", "measure_graph", "set_num_threads", "tune_graph"]


def set_num_threads(count: int) -> int:
    """Use ``count`` TVM worker threads (at most the pool's size); returns the count in use."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, int(count))
    return int(tvm.runtime.num_threads())


@dataclasses.dataclass
class TvmModule:
    name: str
    target: object
    schedule: str
    executable: object
    output_count: int
    # Kernels that ran as TVM's unscheduled loops (no rule matched, no tuning record).
    untuned_kernels: list[str]
    kernel_rules: dict[str, str]  # kernel name -> rule (or "tuned") that scheduled it

    def schedule_summary(self) -> str:
        """One line: how many kernels came from tuning records, from rules, and which ran untuned."""
        tuned = sum(1 for rule in self.kernel_rules.values() if rule == "tuned")
        ruled = len(self.kernel_rules) - tuned
        untuned = ", ".join(self.untuned_kernels) if self.untuned_kernels else "none"
        return (f"tvm ({self.schedule}): {tuned} kernels from tuning records, {ruled} by tfcompile's rules, "
                f"untuned: {untuned}")

    def __post_init__(self) -> None:
        import tvm
        from tvm import relax

        self._device = tvm.cpu()
        self._vm = relax.VirtualMachine(self.executable, self._device)
        self._main = self._vm["main"]

    def to_tvm(self, inputs: tuple[torch.Tensor, ...]) -> list:
        """``inputs`` as TVM tensors on the module's device, the arguments its ``main`` takes."""
        import tvm

        return [tvm.runtime.tensor(t.detach().contiguous().cpu().numpy(), self._device) for t in inputs]

    def new_vm(self):
        """A Relax VM of its own over the module's executable (one to instrument, leaving ``run``'s alone)."""
        from tvm import relax

        return relax.VirtualMachine(self.executable, self._device)

    def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        try:
            result = self._main(*self.to_tvm(inputs))
        except Exception as exc:
            from tfcompile.backends.tvm.lowering import one_line

            raise BackendError(f"tvm: {self.name}: run failed: {one_line(exc)}") from exc
        outputs = flatten_outputs(result)
        return tuple(torch.from_numpy(o.numpy()) for o in outputs)

    def runner(self, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
        args = self.to_tvm(inputs)
        main = self._main

        def call() -> object:
            return main(*args)

        return call


def flatten_outputs(result) -> list:
    if hasattr(result, "numpy"):
        return [result]
    flat = []
    for item in result:
        flat.extend(flatten_outputs(item))
    return flat


def compile_graph(graph: ModelGraph, *, target=None, schedule: str = "auto",
                  database_dir: str | os.PathLike | None = None) -> TvmModule:
    """Lower, schedule and compile ``graph``; ``database_dir`` is the tuning database for "tuned"/"auto"."""
    from tfcompile.backends.tvm import lowering, rules

    if schedule not in SCHEDULES:
        raise BackendError(f"tvm: unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")
    target = host_target() if target is None else as_target(target)
    if schedule == "auto":
        from tfcompile.backends.tvm import tuning

        schedule = "tuned" if tuning.has_database(target, database_dir) else "rules"
    mod = lowering.import_graph(graph)
    # The schedules vectorise over N: give constant weights an N they can vectorise.
    pad = None if schedule == "none" else vector_lanes(target)
    mod = lowering.guarded("legalize/fuse", graph.name, lowering.legalize_and_fuse, mod, target, pad_multiple=pad)
    if schedule == "none":
        schedule_pass, report = None, rules.ScheduleReport()
        report.untuned.extend(sorted(lowering.primfuncs(mod)))
    elif schedule == "rules":
        schedule_pass = rules.ApplyRules(target)
        report = schedule_pass.report
    else:
        from tfcompile.backends.tvm import tuning

        schedule_pass = tuning.ApplyTuned(target, database_dir)
        report = schedule_pass.report
    executable = lowering.build(mod, target, schedule_pass, name=graph.name)
    count = len(graph.output_names)
    return TvmModule(graph.name, target, schedule, executable, count, sorted(report.untuned),
                     dict(report.applied))


def as_target(target):
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    try:
        return tvm.target.Target(target)
    except Exception as exc:
        from tfcompile.backends.tvm.lowering import one_line

        raise BackendError(f"tvm: bad target {target!r}: {one_line(exc)}") from exc


def measure_graph(graph: ModelGraph, *, repeat: int = 10, schedule: str = "auto",
                  inputs: tuple[torch.Tensor, ...] | None = None) -> Measurement:
    """Median latency of ``graph`` compiled by TVM for this CPU (backend name "tvm")."""
    module = compile_graph(graph, schedule=schedule)
    run = module.runner(graph.example_inputs if inputs is None else inputs)
    try:
        return measure(run, backend="tvm", repeat=repeat)
    except Exception as exc:
        from tfcompile.backends.tvm.lowering import one_line

        raise BackendError(f"tvm: {graph.name}: run failed: {one_line(exc)}") from exc


def tune_graph(graph: ModelGraph, **options):
    """MetaSchedule-tune ``graph``'s kernels into the database ``schedule="tuned"`` reads (see ``tuning``)."""
    from tfcompile.backends.tvm.tuning import tune_graph as tune

    return tune(graph, **options)
