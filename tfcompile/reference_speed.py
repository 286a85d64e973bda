"""How fast the host ran a measurement against calibration: calibration micro-benchmarks timed among the variants.

A calibrated profile prices kernels at the speed the host ran its
micro-benchmarks. On a shared VM that speed moves by up to 2x for minutes at
a time: in session 16's second ORT run on the Xeon, calibration ran its suite
in 123 s against 230 s in the first, and the configs measured after the first
six were predicted 25-46 % under while the probe (``cost_models.host_speed``)
read 0.56-0.77x of calibration. A probe is another program at another moment;
it can say that the host slowed down but not by how much for these kernels.

So a measurement that wants to know takes a few of the calibration's own
micro-benchmarks (whole transformer layers, ``REFERENCE_BENCHMARKS``) into
its round-robin, next to the variants: they run on the same runtime, in the
same rounds, so a slow spell hits them as it hits the variants. Their
calibration time over their time now is the host's speed during that
measurement (1: as at calibration; 0.6: the same kernels took 1/0.6 as
long). Nothing here is predicted: both times are measured, so the factor says
how the host changed, not how wrong the model is. Predictions are not
rescaled by it; a report states both the raw figures and those of the
measured times brought to calibration speed (``at_calibration_speed``).
"""

from __future__ import annotations

import dataclasses
import statistics

from tfcompile.compare import ComparisonRow
from tfcompile.graph import ModelGraph

# Whole layers of widths no zoo model has (calibrate.default_suite): GEMMs, attention, norms and
# elementwise in the mix the variants run, at 9-42 ms each on session 16's Xeon.
REFERENCE_BENCHMARKS = ("blocks_d512_l2_b1_s128", "blocks_d640_l2_b1_s96", "blocks_d256_l4_b4_s256")
REFERENCE_PREFIX = "reference "


def reference_graphs(calibration_samples: list[dict]) -> list[ModelGraph]:
    """The reference micro-benchmarks whose calibration times ``calibration_samples`` (a profile's
    ``samples``) record, built again and named ``"reference <name>"``."""
    from tfcompile.calibrate import default_suite
    from tfcompile.graph import export_module

    recorded = {record["name"] for record in calibration_samples}
    graphs = []
    for bench in default_suite():
        if bench.name in REFERENCE_BENCHMARKS and bench.name in recorded:
            module, inputs = bench.build()
            graphs.append(export_module(module, inputs, name=REFERENCE_PREFIX + bench.name))
    return graphs


def is_reference(row: ComparisonRow) -> bool:
    return row.name.startswith(REFERENCE_PREFIX)


def host_speed_factor(rows: list[ComparisonRow], calibration_samples: list[dict]) -> float | None:
    """The median, over the reference rows among ``rows``, of calibration time over measured time (None when
    there are none)."""
    calibrated_s = {REFERENCE_PREFIX + record["name"]: record["measured_s"] for record in calibration_samples}
    ratios = [calibrated_s[row.name] * 1e3 / row.measured_ms for row in rows
              if is_reference(row) and row.name in calibrated_s and row.measured_ms > 0]
    return statistics.median(ratios) if ratios else None


def at_calibration_speed(rows: list[ComparisonRow], speed_factor: float) -> list[ComparisonRow]:
    """``rows`` with their measured times (and timed runs) as they would have been at calibration speed."""
    return [dataclasses.replace(row, measured_ms=row.measured_ms * speed_factor,
                                samples_ms=tuple(tuple(ms * speed_factor for ms in runs) for runs in row.samples_ms))
            for row in rows]
