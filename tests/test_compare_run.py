import json

import pytest

from tfcompile.compare import ComparisonRow, builtin_variant_graphs
from tfcompile.compare_run import CompareRun, run_compare
from tfcompile.cost_models.calibration import CLASSES, Profile
from tfcompile.cost_models.device import load_device
from tfcompile.cost_models.model import CalibratedCostModel
from tfcompile.reference_speed import REFERENCE_BENCHMARKS


def _row(name, measured_ms, predicted_ms):
    return ComparisonRow(name, measured_ms, {"calibrated": predicted_ms}, ((measured_ms,),))


def test_scores_at_calibration_speed_scale_the_measured_times_by_the_reference_factor():
    rows = [_row("m baseline", 200.0, 100.0), _row("m cleanup", 100.0, 50.0)]
    # The host ran the reference layers at half their calibration speed: every time doubled.
    run = CompareRun(rows, reference_speed={"factor": 0.5, "calibration_s": {}, "before_s": {}, "after_s": {}})
    assert run.scores["calibrated"]["mape"] == pytest.approx(0.5)
    assert run.scores_at_calibration_speed["calibrated"]["mape"] == pytest.approx(0.0)
    assert set(run.host_readings) == {"reference_speed", "scores_at_calibration_speed"}
    untimed = CompareRun(rows)
    assert untimed.scores_at_calibration_speed is None and untimed.host_readings == {}


def _calibrated(backend, samples):
    # Every kernel at 1 ms: a profile the prediction does not depend on the host for.
    profile = Profile(target="cpu", backend=backend, s_per_flop=dict.fromkeys(CLASSES, 0.0),
                      s_per_byte=dict.fromkeys(CLASSES, 0.0), kernel_overhead_s=1e-3, graph_overhead_s=0.0,
                      samples=samples)
    return CalibratedCostModel(load_device("cpu"), backend, profile)


def test_the_reference_layers_a_profile_recorded_are_timed_around_the_measurement():
    name = REFERENCE_BENCHMARKS[0]
    cost_model = _calibrated("ort", [{"name": name, "measured_s": 0.010, "predicted_s": 0.010}])
    graphs = builtin_variant_graphs("tests.tiny:bert", [1], [16])
    run = run_compare(graphs, cost_model, repeat=2, pass_count=1, on_this_host=True)
    timed = run.reference_speed
    assert set(timed["before_s"]) == set(timed["after_s"]) == {name} == set(timed["calibration_s"])
    slower = max(timed["before_s"][name], timed["after_s"][name])
    assert 0.010 / slower <= timed["factor"] == pytest.approx(0.010 / min(timed["before_s"][name],
                                                                          timed["after_s"][name]))
    assert len(run.rows) == len(graphs) and run.scores_at_calibration_speed is not None
    assert set(run.host_speed) == {"before_measuring", "after_measuring"}  # the profile recorded no probe
    json.dumps(run.host_readings)  # what compare.json records


@pytest.mark.parametrize("backend,on_this_host", [("torch", True), ("ort", False)])
def test_no_reference_layers_where_calibration_did_not_time_them_as_this_run_would(backend, on_this_host):
    """torch has no recorded stacks to lower alike, and a remote or GPU measurement is not this host's speed."""
    cost_model = _calibrated(backend, [{"name": REFERENCE_BENCHMARKS[0], "measured_s": 0.010, "predicted_s": 0.010}])
    graphs = builtin_variant_graphs("tests.tiny:bert", [1], [16])[:1]
    run = run_compare(graphs, cost_model, repeat=2, pass_count=1, on_this_host=on_this_host)
    assert run.reference_speed is None and run.scores_at_calibration_speed is None
    assert (run.host_speed is not None) == on_this_host


def test_a_reference_recorded_at_zero_seconds_gives_no_factor():
    """A profile passes its loader with a sample's measured_s at 0; the factor would be 0, not a speed."""
    cost_model = _calibrated("ort", [{"name": REFERENCE_BENCHMARKS[0], "measured_s": 0.0, "predicted_s": 0.0}])
    graphs = builtin_variant_graphs("tests.tiny:bert", [1], [16])[:1]
    run = run_compare(graphs, cost_model, repeat=2, pass_count=1, on_this_host=True)
    assert run.reference_speed is None and "reference_speed" not in run.host_readings


def test_compare_prints_the_factor_and_the_scores_at_calibration_speed():
    from rich.console import Console

    from tfcompile.cli_output import show_host_speed

    rows = [_row("m baseline", 200.0, 100.0), _row("m cleanup", 100.0, 50.0)]
    console = Console(record=True, width=200)
    show_host_speed(CompareRun(rows, reference_speed={"factor": 0.5, "calibration_s": {}, "before_s": {},
                                                      "after_s": {}}), console)
    printed = " ".join(console.export_text().split())
    assert "ran at 0.50x of their calibration speed" in printed
    assert "calibrated MAPE 0.0%, 100% within ±10 %" in printed
    quiet = Console(record=True, width=200)
    show_host_speed(CompareRun(rows), quiet)
    assert quiet.export_text() == ""
