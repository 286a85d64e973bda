"""Reports: per-variant records, ranking, short ids and report.json (the table: ``report_table``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Container

from tfcompile.outputs import atomic_write_text

# 2: short ids, rejection reasons, folded variants, timing spread, host, versions, input shapes, provenance.
REPORT_VERSION = 2
SCHEMA_NAME = "report.schema.json"


@dataclasses.dataclass
class VariantReport:
    name: str
    passes: list[str]  # passes that applied, in order
    exact: bool
    predicted_ms: dict[str, float]  # per target
    prediction: str  # how the target's prediction was made: "roofline" or "calibrated T/B"
    flops: float
    bytes: float
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    quality: float | None = None
    quality_metric: str | None = None
    measured_ms: float | None = None
    backend: str | None = None
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)  # passes that did not apply, why
    eligible: bool = True
    note: str = ""
    backend_notes: list[str] = dataclasses.field(default_factory=list)  # e.g. TVM kernels that ran untuned
    # Over a workload of several batch shapes: the target's prediction (and measurement) per scenario and
    # their expectation, which ranks; None for one traced shape.
    scenario_ms: list[float] | None = None
    expected_ms: float | None = None
    scenario_measured_ms: list[float] | None = None
    # Why the variant is not ranked, in a word or two ("below budget", "deviates", ...); ``note`` says it in full.
    rejected: str | None = None
    # The timed runs (ms): median, p10, p90, low, high, runs; and the variant/baseline ratio run by run.
    measured_spread: dict[str, float] | None = None
    vs_baseline: dict[str, float] | None = None
    throughput_per_s: float | None = None  # sequences (or images) per second at the measured batch
    id: str = ""  # short id in the table and the plots: "base", "v1", "v2", ... in rank order
    folded_into: str | None = None  # the simpler variant with the same cost and quality (this one changed nothing)
    # For a generation loop (optimize --generate): TTFT and TPOT predicted per target, measured, and whether the
    # greedy tokens equal Hugging Face generate's; None for one forward pass.
    generation: dict[str, Any] | None = None

    def reject(self, rejected: str, note: str) -> None:
        self.eligible, self.rejected, self.note = False, rejected, note

    def objective_ms(self, target: str) -> float:
        """What ranks the variant before measurement: the expected latency over the workload, if any."""
        return self.expected_ms if self.expected_ms is not None else self.predicted_ms[target]

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.exact:
            data.pop("quality")
            data.pop("quality_metric")
        if self.measured_ms is None:
            data.pop("measured_ms")
            data.pop("backend")
            data.pop("backend_notes")
        for key in ("scenario_ms", "expected_ms", "scenario_measured_ms", "rejected", "measured_spread",
                    "vs_baseline", "throughput_per_s", "folded_into", "generation"):
            if data[key] is None:
                data.pop(key)
        return data

    def fingerprint(self, target: str) -> tuple:
        """What a user compares variants by: equal fingerprints mean the passes made no difference that counts."""
        quality = round(self.quality, 4) if self.quality is not None else None
        return (self.exact, round(self.flops), round(self.bytes), round(self.objective_ms(target), 6), quality,
                self.eligible)


def rank(variants: list[VariantReport], target: str) -> list[VariantReport]:
    """Eligible before ineligible; measured (by measured latency) before predicted-only."""
    def key(v: VariantReport):
        # Among equals, the variant with fewer passes first: it does the same with less.
        if v.measured_ms is not None:
            return (not v.eligible, 0, v.measured_ms, len(v.passes))
        return (not v.eligible, 1, v.objective_ms(target), len(v.passes))

    return sorted(variants, key=key)


def to_measure(reports: dict[str, VariantReport], held: Container[str], target: str, top: int) -> list[str]:
    """The baseline and the ``top`` eligible variants best by prediction, among those whose graphs are ``held``."""
    by_prediction = rank([r for name, r in reports.items() if name in held and name != "baseline"], target)
    return ["baseline"] + [r.name for r in by_prediction if r.eligible][:top]


def finish_ranking(reports: dict[str, VariantReport], held: Container[str],
                   target: str) -> tuple[list[VariantReport], str | None]:
    """Every report ranked with its id, and the best eligible variant whose graph is ``held`` (None: none is)."""
    ranked = rank(list(reports.values()), target)
    assign_ids(ranked, target)
    return ranked, next((r.name for r in ranked if r.eligible and r.name in held), None)


def assign_ids(ranked: list[VariantReport], target: str) -> None:
    """Short ids in rank order ("base" for the baseline); a variant that matches a simpler one in cost and
    quality, and was not measured, changed nothing that counts and is folded into it."""
    number = 0
    for report in ranked:
        if report.name == "baseline":
            report.id = "base"
        else:
            number += 1
            report.id = f"v{number}"
    simplest: dict[tuple, VariantReport] = {}
    for report in ranked:
        kept = simplest.get(report.fingerprint(target))
        if kept is None or len(report.passes) < len(kept.passes):
            simplest[report.fingerprint(target)] = report
    for report in ranked:
        kept = simplest[report.fingerprint(target)]
        if kept is not report and report.measured_ms is None and report.name != "baseline":
            report.folded_into = kept.id


def write_report(path: Path, *, model: str, target: str, variants: list[VariantReport],
                 best: str | None, settings: dict[str, Any], refusals: dict[str, str] | None = None,
                 export: dict[str, Any] | None = None, inputs: list[dict[str, Any]] | None = None,
                 prediction: dict[str, Any] | None = None, host: dict[str, Any] | None = None,
                 versions: dict[str, str | None] | None = None) -> None:
    """report.json, shaped as ``report.schema.json`` (shipped in the package) says."""
    atomic_write_text(path, json.dumps(report_payload(
        model=model, target=target, variants=variants, best=best, settings=settings, refusals=refusals,
        export=export, inputs=inputs, prediction=prediction, host=host, versions=versions), indent=2) + "\n")


def report_payload(*, model: str, target: str, variants: list[VariantReport], best: str | None,
                   settings: dict[str, Any], refusals: dict[str, str] | None = None,
                   export: dict[str, Any] | None = None, inputs: list[dict[str, Any]] | None = None,
                   prediction: dict[str, Any] | None = None, host: dict[str, Any] | None = None,
                   versions: dict[str, str | None] | None = None) -> dict[str, Any]:
    return {
        "version": REPORT_VERSION,
        "schema": SCHEMA_NAME,
        "model": model,
        "target": target,
        "best": best,
        "best_id": next((v.id for v in variants if v.name == best), None),
        "inputs": inputs or [],  # the traced inputs: name, shape, dtype
        "settings": settings,
        "prediction": prediction or {},  # roofline or calibrated, and from which profile
        "host": host or {},  # the machine that ran (and measured) this
        "versions": versions or {},
        "refusals": refusals or {},
        "export": export or {},  # how model.onnx was lowered and how it compares with torch
        "variants": [v.as_dict() for v in variants],
    }


def schema() -> dict[str, Any]:
    """The published JSON Schema of report.json."""
    from importlib import resources

    return json.loads((resources.files("tfcompile") / "schemas" / SCHEMA_NAME).read_text())
