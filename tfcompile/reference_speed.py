"""How fast the host ran a measurement against calibration: calibration's own layer stacks timed around it.

A calibrated profile prices kernels at the speed the host ran its
micro-benchmarks. On a shared VM that speed moves by up to 2x for minutes at
a time: in session 16's second ORT run on the Xeon, calibration ran its suite
in 123 s against 230 s in the first, and the configs measured after the first
six were predicted 25-46 % under while the probe (``cost_models.host_speed``)
read 0.56-0.77x of calibration. The probe times other kernels (torch's GEMM,
a sum over DRAM) than the runtime runs; it can say that the host slowed down
but not by how much for these.

So a measurement that wants to know times a few of the calibration's own
micro-benchmarks (whole transformer layers, ``REFERENCE_BENCHMARKS``) right
before and right after it, on the same runtime and the way calibration timed
them (each alone, warm, median of its runs; ``calibrate.run_suite``). Their
calibration time over the lower of those two times is the host's speed
around that measurement (1: as at calibration; 0.6: the same kernels took
1/0.6 as long). They are not timed among the variants: interleaved with
sessions of other models, a small layer stack loses its cache and shares
the cores with their spinning threads, and read 0.52-0.59x on session 17's
Xeon while the probe read 0.62-0.95x. Nothing here is predicted: both times
are measured, so the factor says how the host changed, not how wrong the
model is. Predictions are not rescaled by it; a report states both the raw
figures and those of the measured times brought to calibration speed
(``at_calibration_speed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Iterator

from tfcompile.compare import ComparisonRow
from tfcompile.cost_models.host_speed import probes_around, speed_record, speed_text

# Whole layers of widths no zoo model has (calibrate.default_suite): GEMMs, attention, norms and
# elementwise in the mix the variants run, at 9-42 ms each on session 16's Xeon.
REFERENCE_BENCHMARKS = ("blocks_d512_l2_b1_s128", "blocks_d640_l2_b1_s96", "blocks_d256_l4_b4_s256")


class ReferenceLayers:
    """The reference benchmarks that a profile's ``samples`` recorded, lowered once on ``backend``."""

    def __init__(self, calibration_samples: list[dict], backend: str, workdir: Path, repeat: int = 10):
        from tfcompile.calibrate import lower_benchmarks

        recorded = {record["name"]: record["measured_s"] for record in calibration_samples}
        self._backend, self._repeat = backend, repeat
        self._runs = lower_benchmarks(backend, workdir, [name for name in REFERENCE_BENCHMARKS if name in recorded])
        self.calibration_s: dict[str, float] = {name: recorded[name] for name in self._runs}

    def time_s(self) -> dict[str, float]:
        """Each reference's median time now, timed alone as calibration times it."""
        from tfcompile.calibrate import time_benchmark_s

        return {name: time_benchmark_s(run, self._backend, repeat=self._repeat) for name, run in self._runs.items()}

    def speed_factor(self, *timings: dict[str, float]) -> float | None:
        return speed_factor(self.calibration_s, *timings)


def speed_factor(calibration_s: dict[str, float], *timings: dict[str, float]) -> float | None:
    """The median, over the references, of their calibration time over the lowest of their ``timings`` (None
    without references or timings)."""
    ratios = [seconds / min(t[name] for t in timings) for name, seconds in calibration_s.items()] if timings else []
    return statistics.median(ratios) if ratios else None


@contextlib.contextmanager
def reference_layers(calibration_samples: list[dict], backend: str, repeat: int = 10) -> Iterator[ReferenceLayers]:
    """``ReferenceLayers`` whose lowered files live as long as the ``with`` body."""
    with tempfile.TemporaryDirectory(prefix="tfcompile-reference-") as workdir:
        yield ReferenceLayers(calibration_samples, backend, Path(workdir), repeat)


def at_calibration_speed(rows: list[ComparisonRow], speed_factor: float) -> list[ComparisonRow]:
    """``rows`` with their measured times (and timed runs) as they would have been at calibration speed."""
    return [dataclasses.replace(row, measured_ms=row.measured_ms * speed_factor,
                                samples_ms=tuple(tuple(ms * speed_factor for ms in runs) for runs in row.samples_ms))
            for row in rows]


# Runtimes whose reference layers a profile records and ``backends.runner.lower`` runs as calibration did.
REFERENCE_BACKENDS = ("ort", "tvm")


@dataclasses.dataclass
class HostReadings:
    """How fast the host ran around a measurement: filled in when the ``readings_around`` body ends."""

    # host_speed.speed_record of the probes around the measurement; None when not measured on this host.
    host_speed: dict | None = None
    # {"factor", "calibration_s", "before_s", "after_s"} of the reference layers; None when none were timed.
    reference_speed: dict | None = None

    @property
    def factor(self) -> float | None:
        return (self.reference_speed or {}).get("factor")

    def annotate(self, provenance: dict) -> dict:
        """A cost model's provenance (report.json's ``prediction``) with these readings, and its text with
        a clause for each."""
        annotated, clauses = dict(provenance), []
        if self.host_speed:
            annotated["host_speed"] = self.host_speed
            clauses.append(speed_text(self.host_speed))
        if self.reference_speed:
            annotated["reference_speed"] = self.reference_speed
            clauses.append(f"calibration's own layer stacks ran at {self.factor:.2f}x of their calibration speed "
                           "around the measurement")
        annotated["text"] = "; ".join([provenance.get("text", "")] + [c for c in clauses if c])
        return annotated


@contextlib.contextmanager
def readings_around(cost_model, on_this_host: bool) -> Iterator[HostReadings]:
    """Probe the host (``host_speed.probes_around``) and, on ORT and TVM with a calibrated profile that
    recorded them on this host (target ``cpu``), time the reference layers, just before and just after the
    ``with`` body (a measurement); nothing when not ``on_this_host`` (a remote device or a GPU measured). The
    readings are set once the body has run; an exception in it leaves them empty."""
    backend, profile = cost_model.backend, getattr(cost_model, "profile", None)
    # A profile of another target (a remote board's) recorded that machine's times, not this host's.
    timed_here = on_this_host and backend in REFERENCE_BACKENDS and profile is not None and profile.target == "cpu"
    samples = profile.samples if timed_here else []
    readings = HostReadings()
    with reference_layers(samples, backend) if samples else contextlib.nullcontext() as references:
        before_s = references.time_s() if references else {}
        with probes_around(on_this_host) as probes:
            yield readings
        after_s = references.time_s() if references else {}
    readings.host_speed = speed_record(cost_model.host_speed, *probes) if probes else None
    factor = references.speed_factor(before_s, after_s) if references else None
    # A profile may record a reference at 0 s (it is checked only for a finite number >= 0): no factor then.
    if factor:
        readings.reference_speed = {"factor": factor, "calibration_s": references.calibration_s,
                                    "before_s": before_s, "after_s": after_s}
