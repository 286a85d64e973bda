"""``optimize``: search variants, verify, predict, measure the best, rank.

Without ``--passes`` the variants come from the search (``search.py``) with
the target's cost model as objective; with it, from that one pipeline next to
the baseline. The CLI is a thin layer over ``optimize``; progress goes through
a callback so the library stays free of terminal code.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from tfcompile.backends.timing import measure_interleaved
from tfcompile.cost_models import available_targets, estimate, load_device
from tfcompile.cost_models.calibration import load_profile
from tfcompile.errors import BackendError
from tfcompile.graph import ModelGraph
from tfcompile.report import VariantReport, rank
from tfcompile.search import Candidate, SearchSettings, default_knob_grid, search
from tfcompile.variants import Variant, VariantSpec, build_variant
from tfcompile.verify import compare_outputs, verify

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
    workload: dict[str, Any] = dataclasses.field(default_factory=dict)
    # --remote/--device-key: a tvm.remote.RemoteSpec; measure with TVM on that device through its RPC tracker.
    remote: Any = None


@dataclasses.dataclass
class OptimizeResult:
    reports: list[VariantReport]  # ranked
    variants: dict[str, Variant]  # those whose graphs are still held
    best: str | None
    refusals: dict[str, str]
    onnx_files: dict[str, Path]  # variants already exported while measuring
    workdir: Path

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


Progress = Callable[[str], None]


def optimize(original: ModelGraph, settings: OptimizeSettings, progress: Progress = lambda _: None) -> OptimizeResult:
    device = load_device(settings.target)  # unknown targets fail before any work
    devices = {name: (device if name == settings.target else load_device(name)) for name in available_targets()}
    profile = load_profile(settings.target, settings.backend)
    if settings.measure and settings.remote is not None:
        from tfcompile.backends.tvm.remote import remote_target, servers_for

        remote_target(settings.target)  # a target tfcompile cannot compile for remotely fails before the search
        servers_for(settings.remote)  # so do a wrong tracker address and a key no server has
    progress("running the original model")
    reference = original.run()
    reports: dict[str, VariantReport] = {}

    def evaluate(variant: Variant) -> Candidate:
        report = _report_for(original, variant, reference, devices, profile, settings)
        reports[variant.name] = report
        return Candidate(variant, report.predicted_ms[settings.target] / 1e3, report.eligible)

    if settings.pipeline is not None:
        candidates = [evaluate(build_variant(original, spec)) for spec in
                      (VariantSpec("baseline", ()), VariantSpec("custom:" + "+".join(settings.pipeline),
                                                               settings.pipeline))]
        refusals = {o.name: o.reason for o in candidates[1].variant.outcomes if not o.applied}
    else:
        search_settings = SearchSettings(allow_approx=settings.allow_approx, workload=settings.workload,
                                         knob_grid=default_knob_grid(settings.target, settings.backend))
        result = search(original, evaluate, search_settings, progress)
        candidates, refusals = result.candidates, result.refusals
    variants = {c.variant.name: c.variant for c in candidates if c.variant.graph is not None}

    workdir = Path(tempfile.mkdtemp(prefix="tfcompile-"))
    onnx_files: dict[str, Path] = {}
    if settings.measure:
        by_prediction = rank([r for name, r in reports.items() if name in variants and name != "baseline"],
                             settings.target)
        chosen = ["baseline"] + [r.name for r in by_prediction if r.eligible][: settings.measure_top]
        _measure({n: variants[n] for n in chosen}, reports, settings, workdir, onnx_files, progress)
    ranked = rank(list(reports.values()), settings.target)
    best = next((r.name for r in ranked if r.eligible and r.name in variants), None)
    return OptimizeResult(ranked, variants, best, refusals, onnx_files, workdir)


def _report_for(original, variant, reference, devices, profile, settings) -> VariantReport:
    estimates = {name: estimate(variant.graph, dev) for name, dev in devices.items()}
    predicted_ms = {name: e.latency_ms for name, e in estimates.items()}
    # A calibration profile for the target and backend beats the datasheet roofline.
    if profile is not None:
        predicted_ms[settings.target] = profile.predict_s(variant.graph) * 1e3
    check = verify(original, variant.graph, reference)
    target_estimate = estimates[settings.target]
    report = VariantReport(
        name=variant.name,
        passes=variant.applied_passes,
        exact=variant.exact,
        predicted_ms=predicted_ms,
        prediction=f"calibrated {settings.target}/{settings.backend}" if profile else "roofline",
        flops=target_estimate.flops,
        bytes=target_estimate.bytes_moved,
        skipped=[{"pass": o.name, "reason": o.reason} for o in variant.outcomes if not o.applied],
    )
    if variant.exact:
        report.max_abs_err, report.max_rel_err = check.max_abs_err, check.max_rel_err
        if check.max_rel_err > EXACT_TOLERANCE:
            report.eligible = False
            report.note = f"exact variant deviates by {check.max_rel_err:.1e} relative: not ranked"
    else:
        report.quality, report.quality_metric = check.quality, check.quality_metric
        if not settings.allow_approx:
            report.eligible, report.note = False, "approximate: needs --allow-approx"
        elif check.quality < settings.budget:
            report.eligible = False
            report.note = f"{check.quality_metric} {check.quality:.4f} below budget {settings.budget}"
    return report


def _measure(variants: dict[str, Variant], reports, settings, workdir, onnx_files, progress) -> None:
    from tfcompile.backends.runner import interleave_block, lower

    if settings.remote is not None:
        _measure_remote(variants, reports, settings, progress)
        return
    runners = {}
    for name, variant in variants.items():
        progress(f"lowering {name} for {settings.backend}")
        lowered = lower(variant.graph, settings.backend, workdir)
        if lowered.onnx_path is not None:
            onnx_files[name] = lowered.onnx_path
        check = compare_outputs(variant.graph.run(), lowered.outputs, variant.graph.output_names)
        if check.max_rel_err > EXACT_TOLERANCE:
            raise BackendError(f"{name}: {settings.backend} output differs from torch by "
                               f"{check.max_rel_err:.1e} relative")
        runners[name] = lowered.run
        reports[name].backend_notes = list(lowered.notes)
    progress(f"measuring {len(runners)} variants on {settings.backend} (median of {settings.repeat})")
    results = measure_interleaved(runners, backend=settings.backend, repeat=settings.repeat,
                                  block=interleave_block(settings.backend))
    for name, measurement in results.items():
        reports[name].measured_ms = measurement.median_ms
        reports[name].backend = settings.backend


def _measure_remote(variants: dict[str, Variant], reports, settings, progress) -> None:
    """Time the variants on a remote device through a TVM RPC tracker, in parallel over its servers.

    Not interleaved like local measurement: each variant holds one server for its
    whole timing, so variants measured at once run on different servers.
    """
    from tfcompile.backends.tvm.remote import measure_many, remote_target

    target, cross_compiler = remote_target(settings.target)
    results = measure_many({name: v.graph for name, v in variants.items()}, settings.remote,
                           repeat=settings.repeat, target=target, cross_compiler=cross_compiler, progress=progress)
    for name, result in results.items():
        graph = variants[name].graph
        check = compare_outputs(graph.run(), result.outputs, graph.output_names)
        if check.max_rel_err > EXACT_TOLERANCE:
            raise BackendError(f"{name}: output on {settings.remote.label} differs from torch by "
                               f"{check.max_rel_err:.1e} relative")
        reports[name].measured_ms = result.measurement.median_ms
        reports[name].backend = settings.remote.label
