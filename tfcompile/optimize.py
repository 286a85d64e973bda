"""``optimize``: variants -> verification -> prediction -> measurement -> ranking.

The CLI is a thin layer over ``optimize``; progress goes through a callback so
the library stays free of terminal code.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from tfcompile.backends.timing import Measurement, measure_interleaved
from tfcompile.cost_models import available_targets, estimate, load_device
from tfcompile.cost_models.calibration import load_profile
from tfcompile.errors import BackendError
from tfcompile.graph import ModelGraph
from tfcompile.report import VariantReport, rank
from tfcompile.variants import BUILTIN_VARIANTS, Variant, VariantSpec, build_variant
from tfcompile.verify import verify

# An exact variant whose output moves more than this (relative to the largest
# output magnitude) is reported as broken rather than ranked.
EXACT_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class OptimizeSettings:
    target: str
    specs: tuple[VariantSpec, ...] = BUILTIN_VARIANTS
    allow_approx: bool = False
    budget: float = 0.99  # minimum quality figure for approximate variants
    measure: bool = False
    backend: str = "ort"
    repeat: int = 10


@dataclasses.dataclass
class OptimizeResult:
    reports: list[VariantReport]  # ranked
    variants: dict[str, Variant]
    best: str | None
    onnx_files: dict[str, Path]  # variants already exported while measuring
    workdir: Path

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


Progress = Callable[[str], None]


def optimize(original: ModelGraph, settings: OptimizeSettings, progress: Progress = lambda _: None) -> OptimizeResult:
    device = load_device(settings.target)  # unknown targets fail before any work
    devices = {name: (device if name == settings.target else load_device(name)) for name in available_targets()}
    progress("running the original model")
    reference = original.run()

    variants: dict[str, Variant] = {}
    reports: list[VariantReport] = []
    seen_pipelines: dict[tuple[str, ...], str] = {}
    for spec in settings.specs:
        progress(f"building variant {spec.name}")
        variant = build_variant(original, spec)
        applied = tuple(variant.applied_passes)
        if spec.passes and applied in seen_pipelines:
            progress(f"{spec.name}: same passes applied as {seen_pipelines[applied]}, skipped")
            continue
        seen_pipelines.setdefault(applied, spec.name)
        variants[spec.name] = variant
        reports.append(_report_for(original, variant, reference, devices, settings))

    workdir = Path(tempfile.mkdtemp(prefix="tfcompile-"))
    onnx_files: dict[str, Path] = {}
    if settings.measure:
        _measure(variants, reports, settings, workdir, onnx_files, progress)
    ranked = rank(reports, settings.target)
    best = next((r.name for r in ranked if r.eligible), None)
    return OptimizeResult(ranked, variants, best, onnx_files, workdir)


def _report_for(original: ModelGraph, variant: Variant, reference, devices, settings) -> VariantReport:
    estimates = {name: estimate(variant.graph, dev) for name, dev in devices.items()}
    predicted_ms = {name: e.latency_ms for name, e in estimates.items()}
    # A calibration profile for the target and backend beats the datasheet roofline.
    profile = load_profile(settings.target, settings.backend)
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


def _measure(variants, reports, settings, workdir, onnx_files, progress) -> None:
    from tfcompile.backends.runner import lower

    runners = {}
    for report in reports:
        graph = variants[report.name].graph
        progress(f"lowering {report.name} for {settings.backend}")
        lowered = lower(graph, settings.backend, workdir)
        if lowered.onnx_path is not None:
            onnx_files[report.name] = lowered.onnx_path
        _check_backend_outputs(report, graph, lowered.outputs)
        runners[report.name] = lowered.run
    progress(f"measuring {len(runners)} variants on {settings.backend} (median of {settings.repeat})")
    results: dict[str, Measurement] = measure_interleaved(runners, backend=settings.backend, repeat=settings.repeat)
    for report in reports:
        report.measured_ms = results[report.name].median_ms
        report.backend = settings.backend


def _check_backend_outputs(report: VariantReport, graph: ModelGraph, outputs) -> None:
    """The lowered model must compute what the torch graph computes."""
    from tfcompile.verify import compare_outputs

    check = compare_outputs(graph.run(), outputs, graph.output_names)
    if check.max_rel_err > EXACT_TOLERANCE:
        raise BackendError(f"{report.name}: backend output differs from torch by {check.max_rel_err:.1e} relative")

