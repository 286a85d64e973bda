"""One ``tfcompile compare`` measurement: every variant measured and predicted, and how fast the host ran.

On a shared host a comparison can miss because the model is wrong or because the host ran at another
speed than when it was calibrated. Two readings around the measurement tell them apart, and neither
rescales a prediction:

- the probe (``cost_models.host_speed``): torch's GEMM and a DRAM read, before and after;
- on ORT and TVM with a calibrated profile, the calibration's own layer stacks timed just before and just
  after the measurement on the same runtime (``reference_speed``): the factor by which the host ran them
  slower or faster than at calibration, and the scores with the measured times brought to calibration speed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from tfcompile.compare import ComparisonRow, lowest_of_passes, measure_and_predict, score
from tfcompile.graph import ModelGraph
from tfcompile.reference_speed import at_calibration_speed, readings_around


@dataclasses.dataclass
class CompareRun:
    rows: list[ComparisonRow]
    # host_speed.speed_record of the probes around the measurement; None when not measured on this host.
    host_speed: dict | None = None
    # {"factor", "calibration_s", "before_s", "after_s"} of the reference layers; None when none were timed.
    reference_speed: dict | None = None

    @property
    def host_readings(self) -> dict:
        """What compare.json records of the host's speed: each reading taken, and the scores it implies."""
        readings = {"host_speed": self.host_speed, "reference_speed": self.reference_speed,
                    "scores_at_calibration_speed": self.scores_at_calibration_speed}
        return {key: value for key, value in readings.items() if value}

    @functools.cached_property
    def scores(self) -> dict:
        return score(self.rows)

    @functools.cached_property
    def scores_at_calibration_speed(self) -> dict | None:
        """The scores with every measured time brought to calibration speed (``reference_speed``'s factor)."""
        factor = (self.reference_speed or {}).get("factor")
        return score(at_calibration_speed(self.rows, factor)) if factor else None


def run_compare(graphs: list[ModelGraph], cost_model, *, repeat: int, pass_count: int,
                on_this_host: bool, remote=None, torch_options: dict[str, str] | None = None,
                progress: Callable[[str], None] = lambda message: None) -> CompareRun:
    """Measure and predict ``graphs`` ``pass_count`` times (each variant's lowest median kept), with the
    probe and, where a calibrated profile recorded them, the reference layers timed around it all, on
    ``cost_model``'s backend. ``on_this_host``: measured on this host's CPU (not on a remote device or a GPU)."""
    torch_options = torch_options or {}
    with readings_around(cost_model, on_this_host) as readings:
        rows = lowest_of_passes([
            measure_and_predict(graphs, cost_model=cost_model, repeat=repeat,
                                progress=lambda m, i=i: progress(f"round {i + 1}/{pass_count}: {m}"),
                                remote=remote, group_key=lambda graph: graph.name.rsplit(" ", 1)[0],
                                **torch_options)
            for i in range(pass_count)])
    return CompareRun(rows, readings.host_speed, readings.reference_speed)
