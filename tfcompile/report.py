"""Reports: per-variant records, ranking, the rich table and report.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tfcompile.outputs import atomic_write_text

REPORT_VERSION = 1


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
        for key in ("scenario_ms", "expected_ms", "scenario_measured_ms"):
            if data[key] is None:
                data.pop(key)
        return data


def rank(variants: list[VariantReport], target: str) -> list[VariantReport]:
    """Eligible before ineligible; measured (by measured latency) before predicted-only."""
    def key(v: VariantReport):
        if v.measured_ms is not None:
            return (not v.eligible, 0, v.measured_ms)
        return (not v.eligible, 1, v.objective_ms(target))

    return sorted(variants, key=key)


def render_table(variants: list[VariantReport], target: str, console: Console, title: str) -> None:
    measured = any(v.measured_ms is not None for v in variants)
    baseline = next((v for v in variants if v.name == "baseline"), None)
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("variant")
    table.add_column("passes applied")
    over_workload = any(v.expected_ms is not None for v in variants)
    table.add_column(f"{'expected' if over_workload else 'predicted'} ms ({target})", justify="right")
    if measured:
        table.add_column(f"{'expected ' if over_workload else ''}measured ms ({variants[0].backend or ''})",
                         justify="right")
        table.add_column("vs baseline", justify="right")
    table.add_column("exact")
    table.add_column("error / quality", justify="right")
    for i, v in enumerate(variants, 1):
        row = [str(i) if v.eligible else "-", v.name, ", ".join(v.passes) or "(none)",
               f"{v.objective_ms(target):.3f}"]
        if measured:
            row.append("" if v.measured_ms is None else f"{v.measured_ms:.2f}")
            ratio = (v.measured_ms / baseline.measured_ms
                     if baseline and v.measured_ms and baseline.measured_ms else None)
            row.append("" if ratio is None else f"{ratio:.3f}x")
        row.append("yes" if v.exact else "no")
        row.append(f"rel {v.max_rel_err:.1e}" if v.exact and v.max_rel_err is not None
                   else f"{v.quality_metric} {v.quality:.4f}" if v.quality is not None else "")
        table.add_row(*row, style=None if v.eligible else "dim")
    console.print(table)


def write_report(path: Path, *, model: str, target: str, variants: list[VariantReport],
                 best: str | None, settings: dict[str, Any], refusals: dict[str, str] | None = None,
                 export: dict[str, Any] | None = None) -> None:
    payload = {
        "version": REPORT_VERSION,
        "model": model,
        "target": target,
        "best": best,
        "settings": settings,
        "refusals": refusals or {},
        "export": export or {},  # how model.onnx was lowered and how it compares with torch
        "variants": [v.as_dict() for v in variants],
    }
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
