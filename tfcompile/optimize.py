"""``optimize``: search variants, verify, predict, measure the best, rank.

Without a pipeline the variants come from the search (``search.py``) with the
context's cost model as objective; with one, from that pipeline next to the
baseline. One ``PassContext`` is built here, once, from the target, the
backend and the workload, and handed to the search and every pass.
``pipeline.optimize_model`` wraps this with loading, export and the report;
progress goes through a callback so the library stays free of terminal code.

Approximate variants of a model with calibration text (``QualitySplits``:
corpus passages for the zoo's sentence encoders, or the user's sentences in
``calibration_text``) are judged on two disjoint splits: the token passes'
schedules are searched on the calibration split (``search.budget_knob_grid``),
and every approximate variant is eligible only when its calibration figure's
lower confidence bound and its held-out figure both meet the budget. The
reported ``quality`` is the held-out figure; ``note`` gives both.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

from tfcompile.cost_models import available_targets, load_device
from tfcompile.cost_models.device import DeviceSpec
from tfcompile.workload_cost import LoadAt, ScenarioGraphs, price_over_workload, scenario_graphs_for_measurement
from tfcompile.cost_models.model import RooflineCostModel
from tfcompile.graph import ModelGraph
from tfcompile.knob_search.quality_data import QualitySplits
from tfcompile.knob_search.token_budget import within_budget
from tfcompile.backends.timing import Measurement, ratio_spread
from tfcompile.measure import measure_here, measure_remote
from tfcompile.passes import PassContext, Workload, all_passes, check_pipeline
from tfcompile.reference_speed import readings_around
from tfcompile.report import VariantReport, finish_ranking, to_measure
from tfcompile.search import Candidate, SearchSettings, budget_knob_grid, default_knob_grid, search
from tfcompile.variants import Variant, VariantSpec, build_variant
from tfcompile.verify import verify

# An exact variant whose output moves more than this (relative to the largest
# output magnitude) is reported as broken rather than ranked.
EXACT_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class OptimizeSettings:
    target: str
    pipeline: tuple[str, ...] | None = None  # --passes: evaluate this pipeline instead of searching
    allow_approx: bool = False
    budget: float = 0.99  # minimum quality figure for approximate variants
    measure: bool = False
    measure_top: int = 1  # eligible variants measured besides the baseline (best predicted first)
    backend: str = "ort"
    repeat: int = 10
    measure_budget_s: float | None = None  # --time-budget: stop timing a set of variants once this is spent
    workload: Workload = Workload()
    # --remote/--device-key: a tvm.remote.RemoteSpec; measure with TVM on that device through its RPC tracker.
    remote: Any = None
    # --device-file: the user's own device, ranked under its name (``target``) instead of a shipped one.
    device: DeviceSpec | None = None
    # --calibration-data: the user's sentences (alternate ones calibrate and are held out); None: the corpus.
    calibration_text: tuple[str, ...] | None = None
    # --device/--mode/--precision with --backend torch (measure.measure_here's keywords); {}: cpu eager fp32.
    torch_options: dict[str, str] = dataclasses.field(default_factory=dict)

    def context(self) -> PassContext:
        return PassContext.build(self.device or self.target, self.backend, workload=self.workload)


@dataclasses.dataclass
class OptimizeResult:
    reports: list[VariantReport]  # ranked
    variants: dict[str, Variant]  # those whose graphs are still held
    best: str | None
    refusals: dict[str, str]
    onnx_files: dict[str, Path]  # variants already exported while measuring
    workdir: Path
    prediction: dict[str, Any] = dataclasses.field(default_factory=dict)  # the target's cost model: which, whence
    schedules: dict[str, Any] = dataclasses.field(default_factory=dict)  # token_budget.Schedule per token pass
    quality_data: str | None = None  # where the calibration and held-out inputs came from (None: example inputs)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


Progress = Callable[[str], None]


def optimize(original: ModelGraph, settings: OptimizeSettings, progress: Progress = lambda _: None,
             load_at: LoadAt | None = None) -> OptimizeResult:
    """``load_at(batch, seq)``: the original traced at another shape, for workloads of several batch shapes."""
    context = settings.context()  # an unknown target fails here, before any work
    rooflines = {name: RooflineCostModel(context.device if name == context.target else load_device(name),
                                         context.backend) for name in available_targets()}
    if settings.pipeline is not None:
        check_pipeline(settings.pipeline)
    if settings.measure and settings.remote is not None:
        from tfcompile.backends.tvm.remote import remote_target, servers_for

        remote_target(settings.target)  # a target tfcompile cannot compile for remotely fails before the search
        servers_for(settings.remote)  # so do a wrong tracker address and a key no server has
    progress("running the original model")
    reference = original.run()
    splits = _quality_splits(original, settings) if settings.allow_approx else None
    reports: dict[str, VariantReport] = {}
    schedules: dict[str, Any] = {}

    def evaluate(variant: Variant) -> Candidate:
        report = _report_for(original, variant, reference, context, rooflines, settings, splits)
        reports[variant.name] = report
        return Candidate(variant, report.predicted_ms[settings.target] / 1e3, report.eligible)

    if settings.pipeline is not None:
        specs = (VariantSpec("baseline", ()), VariantSpec("custom:" + "+".join(settings.pipeline), settings.pipeline))
        candidates = [evaluate(build_variant(original, spec, context)) for spec in specs]
        refusals = {o.name: o.reason for o in candidates[1].variant.outcomes if not o.applied}
    else:
        search_settings = SearchSettings(allow_approx=settings.allow_approx, knob_grid=default_knob_grid())
        if splits is not None:
            search_settings, schedules = budget_knob_grid(original, splits, settings.budget, context,
                                                          search_settings, progress)
        result = search(original, evaluate, search_settings, context, progress)
        candidates, refusals = result.candidates, result.refusals
    variants = {c.variant.name: c.variant for c in candidates if c.variant.graph is not None}
    scenario_graphs = None
    if not context.workload.is_single_shape:
        scenario_graphs = ScenarioGraphs(original, load_at)
        _price_over_workload(variants, reports, scenario_graphs, context, progress)

    workdir = Path(tempfile.mkdtemp(prefix="tfcompile-"))
    onnx_files: dict[str, Path] = {}
    on_this_host = settings.remote is None and settings.torch_options.get("device") != "cuda"
    try:
        with readings_around(context.cost_model, settings.measure and on_this_host) as readings:
            if settings.measure:
                chosen = to_measure(reports, variants, settings.target, settings.measure_top)
                _measure({n: variants[n] for n in chosen}, reports, settings, workdir, onnx_files, progress,
                         scenario_graphs)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    ranked, best = finish_ranking(reports, variants, settings.target)
    prediction = readings.annotate(context.cost_model.provenance)
    return OptimizeResult(ranked, variants, best, refusals, onnx_files, workdir, prediction,
                          schedules, splits.source if splits is not None else None)


def _quality_splits(original: ModelGraph, settings: OptimizeSettings) -> QualitySplits | None:
    if settings.calibration_text is not None:
        return QualitySplits.from_lines(original, list(settings.calibration_text), "--calibration-data")
    return QualitySplits.for_graph(original)


def _report_for(original, variant, reference, context: PassContext, rooflines, settings,
                splits: QualitySplits | None = None) -> VariantReport:
    estimates = {name: model.predict(variant.graph) for name, model in rooflines.items()}
    predicted_ms = {name: e.latency_s * 1e3 for name, e in estimates.items()}
    # The context's model (calibrated for the target and backend when a profile exists) ranks the target.
    target_prediction = context.cost_model.predict(variant.graph)
    predicted_ms[settings.target] = target_prediction.latency_s * 1e3
    check = verify(original, variant.graph, reference, lengths=context.workload.lengths)
    report = VariantReport(
        name=variant.name,
        passes=variant.applied_passes,
        exact=variant.exact,
        predicted_ms=predicted_ms,
        prediction=context.cost_model.label,
        flops=target_prediction.flops,
        bytes=target_prediction.bytes_moved,
        skipped=[{"pass": o.name, "reason": o.reason} for o in variant.outcomes if not o.applied],
    )
    if variant.exact:
        report.max_abs_err, report.max_rel_err = check.max_abs_err, check.max_rel_err
        if check.max_rel_err > EXACT_TOLERANCE:
            report.reject("deviates", f"exact variant deviates by {check.max_rel_err:.1e} relative: not ranked")
    elif splits is not None:
        _judge_on_splits(report, variant.graph, splits, settings.budget)
    else:
        report.quality, report.quality_metric = check.quality, check.quality_metric
        if not settings.allow_approx:
            report.reject("approximate", "approximate: needs --allow-approx")
        elif check.quality < settings.budget:
            report.reject("below budget", f"{check.quality_metric} {check.quality:.4f} below budget {settings.budget}")
    return report


def _judge_on_splits(report: VariantReport, graph: ModelGraph, splits: QualitySplits, budget: float) -> None:
    """Quality = the held-out figure; eligible when calibration (lower bound) and held-out both meet the budget."""
    calibration, heldout = splits.figure(graph, "calibration"), splits.figure(graph, "heldout")
    report.quality, report.quality_metric = heldout.quality, heldout.metric
    figures = (f"held-out {heldout.metric} {heldout.quality:.4f} on {heldout.rows} rows; calibration "
               f"{calibration.quality:.4f} ± {calibration.stderr:.4f} on {calibration.rows} rows")
    report.note = figures
    if not within_budget(calibration, budget):
        report.reject("below budget", f"calibration {calibration.metric} {calibration.quality:.4f} ± "
                                      f"{calibration.stderr:.4f}: lower bound below budget {budget} ({figures})")
    elif heldout.quality < budget:
        report.reject("held-out low", f"within budget {budget} on the calibration text but not on held-out text: "
                                      f"not eligible ({figures})")


def _price_over_workload(variants, reports, scenario_graphs, context, progress) -> None:
    for name, price in price_over_workload(variants, scenario_graphs, context, progress).items():
        report = reports[name]
        report.scenario_ms, report.expected_ms = price.scenario_ms, price.expected_ms
        if price.ineligible and report.eligible:
            report.reject("fixed lengths", price.ineligible)
        if price.worst_rel_err is not None and price.worst_rel_err > EXACT_TOLERANCE and report.eligible:
            report.reject("deviates", f"exact at the traced batch but deviates by {price.worst_rel_err:.1e} "
                                      "relative on the workload's other batches: not ranked")
        elif price.worst_rel_err is not None and report.max_rel_err is not None:
            report.max_rel_err = max(report.max_rel_err, price.worst_rel_err)


def _measure(variants: dict[str, Variant], reports, settings, workdir, onnx_files, progress,
             scenario_graphs: ScenarioGraphs | None = None) -> None:
    if scenario_graphs is not None:
        _measure_over_workload(variants, reports, settings, workdir, progress, scenario_graphs)
        return
    graphs = {name: v.graph for name, v in variants.items()}
    batch = _batch_of(variants["baseline"].graph)
    if settings.remote is not None:
        timed = measure_remote(graphs, settings.remote, settings.target, repeat=settings.repeat, progress=progress)
    else:
        timed = measure_here(graphs, settings.backend, workdir, repeat=settings.repeat, keep_files=True,
                             progress=progress, max_total_s=settings.measure_budget_s, **settings.torch_options)
    for name, result in timed.items():
        _record_timing(reports[name], result.measurement, timed["baseline"].measurement, batch)
        reports[name].backend = result.runtime
        reports[name].backend_notes = result.notes
        if result.onnx_path is not None:
            onnx_files[name] = result.onnx_path


def _record_timing(report: VariantReport, measurement: Measurement, baseline: Measurement, batch: float) -> None:
    """The median and its spread, the ratio to the baseline run by run, and sequences per second."""
    report.measured_ms = measurement.median_ms
    report.measured_spread = measurement.spread.as_dict()
    report.vs_baseline = ratio_spread(measurement, baseline).as_dict()
    report.throughput_per_s = batch / measurement.median_s if measurement.median_s > 0 else None


def _measure_over_workload(variants, reports, settings, workdir, progress, scenario_graphs) -> None:
    """Every chosen variant on every scenario's batch, all timed round-robin in one process."""
    context = settings.context()
    runs = {}
    for name, variant in variants.items():
        for i, graph in enumerate(scenario_graphs_for_measurement(variant, scenario_graphs, context)):
            runs[(name, i)] = graph
    timed = measure_here({f"{name}@{i}": g for (name, i), g in runs.items()}, settings.backend, workdir,
                         repeat=settings.repeat, progress=progress, max_total_s=settings.measure_budget_s,
                         **settings.torch_options)
    scenarios = context.workload.scenarios
    expected = {}
    for name in variants:
        per_scenario = [timed[f"{name}@{i}"].measurement for i in range(len(scenarios))]
        reports[name].scenario_measured_ms = [m.median_ms for m in per_scenario]
        # All scenarios ran round-robin with as many runs each: run k of every scenario saw one machine state,
        # so their expectation, run by run, is a sample of the workload's latency.
        runs_per_scenario = min(len(m.samples_s) for m in per_scenario)
        samples = tuple(context.workload.expected([m.samples_s[k] for m in per_scenario])
                        for k in range(runs_per_scenario))
        expected[name] = Measurement(settings.backend, statistics.median(samples), samples)
    mean_batch = context.workload.expected([float(s.batch) for s in scenarios])
    for name in variants:
        _record_timing(reports[name], expected[name], expected["baseline"], mean_batch)
        # The workload's latency is the expectation of the scenarios' medians, as predicted; the run-by-run
        # samples above give its spread.
        reports[name].measured_ms = context.workload.expected(reports[name].scenario_measured_ms)
        reports[name].backend = timed[f"{name}@0"].runtime
        reports[name].backend_notes = timed[f"{name}@0"].notes


def _batch_of(graph: ModelGraph) -> int:
    shapes = [t.shape for t in graph.example_inputs if getattr(t, "dim", lambda: 0)() >= 1]
    return int(shapes[0][0]) if shapes else 1


def explain(result: OptimizeResult) -> list[tuple[str, bool, str]]:
    """(pass, in the best variant, why) for every registered pass: what ``--explain`` shows."""
    best = next(r for r in result.reports if r.name == result.best) if result.best else None
    rows = []
    for p in all_passes():
        used = best is not None and p.name in best.passes
        if used:
            reason = "applied"
        elif any(p.name in r.passes for r in result.reports):
            reason = "applied in other variants; the best variant is faster without it"
        elif p.name in result.refusals:
            reason = result.refusals[p.name]
        elif not p.exact:
            reason = "approximate: searched only with --allow-approx"
        else:
            reason = "not reached: no variant in the search frontier could take it"
        rows.append((p.name, used, reason))
    return rows
