"""Where a prediction is off: for the variants furthest off, the predicted and the measured time per group of ops.

``compare`` scores each variant's total; this splits the worst ones
(``cost_models.attribution.GROUPS``): the cost model's kernels on one side,
ONNX Runtime's profile of the same variant on the other
(``backends.ort_profile``), so a report can say "attention priced at 51 ms,
ran 73 ms; other ops priced at 14 ms, ran 37 ms" instead of "-22 %". ORT
only: it is the runtime whose profiler names each node's op type and shapes.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from tfcompile.compare import ComparisonRow
from tfcompile.cost_models.attribution import GROUPS, furthest_off, predicted_ms_by_group
from tfcompile.errors import InvalidOptionError
from tfcompile.graph import ModelGraph

EXPLAINED_BACKENDS = ("ort",)
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


DEFAULT_COUNT = 3


def explained_count(backend: str, requested: int | None) -> int:
    """How many variants ``compare --explain-ops`` splits: DEFAULT_COUNT on ORT unless asked otherwise, none
    on another backend; asking for some there is an error, before anything is measured."""
    if requested is None:
        return DEFAULT_COUNT if backend in EXPLAINED_BACKENDS else 0
    if requested and backend not in EXPLAINED_BACKENDS:
        raise InvalidOptionError(f"--explain-ops splits a variant's time with ONNX Runtime's profiler; backend "
                                 f"{backend} has none here: use --backend ort, or --explain-ops 0")
    return requested


def furthest_rows(rows: list[ComparisonRow], count: int) -> tuple[str, list[ComparisonRow]]:
    """The predictor split (calibrated when there is one) and its ``count`` rows furthest off, worst first."""
    predictor = "calibrated" if rows and all("calibrated" in r.predicted_ms for r in rows) else "roofline"
    ranked = sorted(rows, key=lambda r: -abs(r.predicted_ms[predictor] - r.measured_ms) / r.measured_ms)
    return predictor, ranked[:count]


def explain(rows: list[ComparisonRow], graphs: dict[str, ModelGraph], cost_model, *, count: int,
            threads: int | None = None) -> list[Explanation]:
    """Profile the ``count`` rows furthest off on ORT and split both sides per group."""
    from tfcompile.backends import ort
    from tfcompile.backends.ort_profile import ms_by_group, profile_runs

    predictor, worst = furthest_rows(rows, count)
    explanations = []
    with tempfile.TemporaryDirectory(prefix="tfcompile-explain-") as workdir:
        for index, row in enumerate(worst):
            graph = graphs[row.name]
            path = ort.export_onnx(graph, Path(workdir) / f"variant{index}.onnx", external_data=True)
            profile = profile_runs(path, graph.example_inputs, runs=PROFILED_RUNS, threads=threads)
            predicted, measured = predicted_ms_by_group(graph, cost_model), ms_by_group(profile)
            group, off_ms = furthest_off(predicted, measured)
            explanations.append(Explanation(row.name, predictor, predicted, measured, profile.run_ms, group, off_ms))
            for leftover in Path(workdir).iterdir():
                leftover.unlink()
    return explanations


def groups_off_ms(explanations: list[Explanation]) -> dict[str, float]:
    """Per group, predicted less measured summed over the explained variants, furthest off first."""
    totals = {group: sum(e.predicted_ms[group] - e.measured_ms[group] for e in explanations) for group in GROUPS}
    return dict(sorted(totals.items(), key=lambda item: -abs(item[1])))
