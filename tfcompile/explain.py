"""Where a prediction is off: for the variants furthest off, the predicted and the measured time per group of ops.

``compare`` scores each variant's total; this splits the worst ones
(``cost_models.attribution.GROUPS``): the cost model's kernels on one side,
ONNX Runtime's profile of the same variant on the other
(``backends.ort_profile``), or TVM's per-kernel times from the Relax VM's
instrument hook (``backends.tvm.profile``), so a report can say "attention
priced at 51 ms, ran 73 ms; other ops priced at 14 ms, ran 37 ms" instead of
"-22 %". On both, the runtime's own kernels are named and shaped; torch eager
has no such profile here.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from tfcompile.compare import ComparisonRow
from tfcompile.cost_models.attribution import GROUPS, furthest_off, predicted_ms_by_group
from tfcompile.errors import InvalidOptionError
from tfcompile.graph import ModelGraph

EXPLAINED_BACKENDS = ("ort", "tvm")
PROFILED_BY = {"ort": "ORT's profiler", "tvm": "TVM's VM instrument"}
PROFILED_RUNS = 5


@dataclasses.dataclass(frozen=True)
class Explanation:
    variant: str
    predictor: str  # whose prediction is split: "calibrated", or "roofline" without a profile
    predicted_ms: dict[str, float]  # per group
    measured_ms: dict[str, float]  # per group, from the runtime's profiler
    profiled_run_ms: float  # the profiled runs' own duration (profiling adds a little to each node)
    furthest_group: str
    furthest_off_ms: float  # predicted less measured in that group
    profiled_by: str = "ORT's profiler"


DEFAULT_COUNT = 3


def explained_count(backend: str, requested: int | None) -> int:
    """How many variants ``compare --explain-ops`` splits: DEFAULT_COUNT on ORT and TVM unless asked otherwise,
    none on another backend; asking for some there is an error, before anything is measured."""
    if requested is None:
        return DEFAULT_COUNT if backend in EXPLAINED_BACKENDS else 0
    if requested and backend not in EXPLAINED_BACKENDS:
        raise InvalidOptionError(f"--explain-ops splits a variant's time with its runtime's per-kernel profile; "
                                 f"backend {backend} has none here: use --backend ort or tvm, or --explain-ops 0")
    return requested


def furthest_rows(rows: list[ComparisonRow], count: int) -> tuple[str, list[ComparisonRow]]:
    """The predictor split (calibrated when there is one) and its ``count`` rows furthest off, worst first."""
    predictor = "calibrated" if rows and all("calibrated" in r.predicted_ms for r in rows) else "roofline"
    ranked = sorted(rows, key=lambda r: -abs(r.predicted_ms[predictor] - r.measured_ms) / r.measured_ms)
    return predictor, ranked[:count]


def explain(rows: list[ComparisonRow], graphs: dict[str, ModelGraph], cost_model, *, count: int,
            threads: int | None = None) -> list[Explanation]:
    """Profile the ``count`` rows furthest off on ``cost_model``'s backend (ORT or TVM) and split both sides
    per group."""
    predictor, worst = furthest_rows(rows, count)
    explanations = []
    for row in worst:
        graph = graphs[row.name]
        measured, run_ms = _profiled_ms_by_group(graph, cost_model.backend, threads)
        predicted = predicted_ms_by_group(graph, cost_model)
        group, off_ms = furthest_off(predicted, measured)
        explanations.append(Explanation(row.name, predictor, predicted, measured, run_ms, group, off_ms,
                                        PROFILED_BY.get(cost_model.backend, cost_model.backend)))
    return explanations


def _profiled_ms_by_group(graph: ModelGraph, backend: str, threads: int | None) -> tuple[dict[str, float], float]:
    if backend == "tvm":
        from tfcompile.backends import tvm
        from tfcompile.backends.tvm import profile

        if threads:
            tvm.set_num_threads(threads)
        run = profile.profile_runs(tvm.compile_graph(graph), graph.example_inputs, runs=PROFILED_RUNS)
        return profile.ms_by_group(run), run.run_ms
    from tfcompile.backends import ort
    from tfcompile.backends.ort_profile import ms_by_group, profile_runs

    with tempfile.TemporaryDirectory(prefix="tfcompile-explain-") as workdir:
        path = ort.export_onnx(graph, Path(workdir) / "variant.onnx", external_data=True)
        run = profile_runs(path, graph.example_inputs, runs=PROFILED_RUNS, threads=threads)
    return ms_by_group(run), run.run_ms


def groups_off_ms(explanations: list[Explanation]) -> dict[str, float]:
    """Per group, predicted less measured summed over the explained variants, furthest off first."""
    totals = {group: sum(e.predicted_ms[group] - e.measured_ms[group] for e in explanations) for group in GROUPS}
    return dict(sorted(totals.items(), key=lambda item: -abs(item[1])))
