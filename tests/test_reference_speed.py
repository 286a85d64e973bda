import pytest

from tfcompile.compare import ComparisonRow, measured_speedup, score
from tfcompile.reference_speed import REFERENCE_BENCHMARKS, at_calibration_speed, reference_layers, speed_factor


def _row(name, ms, predicted=None, runs=()):
    return ComparisonRow(name, ms, predicted or {"calibrated": ms}, (tuple(runs),) if runs else ())


def test_the_factor_is_calibration_time_over_the_lower_time_around_the_measurement():
    calibration_s = {"blocks_a": 0.010, "blocks_b": 0.020, "blocks_c": 0.040}
    before = {"blocks_a": 0.020, "blocks_b": 0.025, "blocks_c": 0.050}
    after = {"blocks_a": 0.025, "blocks_b": 0.040, "blocks_c": 0.040}
    # Lower times 20, 25 and 40 ms: the host ran these layers at 0.5, 0.8 and 1.0 of calibration speed.
    assert speed_factor(calibration_s, before, after) == pytest.approx(0.8)
    assert speed_factor(calibration_s, before) == pytest.approx(0.8)
    assert speed_factor(calibration_s) is None and speed_factor({}, before) is None


def test_times_at_calibration_speed_keep_every_speed_up_and_fix_a_uniform_slowdown():
    baseline = _row("m baseline", 200.0, {"calibrated": 100.0}, runs=(210.0, 200.0, 190.0))
    variant = _row("m cleanup", 100.0, {"calibrated": 50.0}, runs=(105.0, 100.0, 95.0))
    steadied = at_calibration_speed([baseline, variant], 0.5)
    assert [r.measured_ms for r in steadied] == [100.0, 50.0]
    assert steadied[0].samples_ms == ((105.0, 100.0, 95.0),)
    assert measured_speedup(steadied[1], steadied[0]) == pytest.approx(measured_speedup(variant, baseline))
    assert score([baseline, variant])["calibrated"]["mape"] == pytest.approx(0.5)
    assert score(steadied)["calibrated"]["mape"] == pytest.approx(0.0)


def test_the_recorded_reference_layers_are_lowered_and_timed_on_the_runtime():
    name = REFERENCE_BENCHMARKS[0]
    samples = [{"name": name, "measured_s": 0.010, "predicted_s": 0.011},
               {"name": "gelu_16384", "measured_s": 0.001, "predicted_s": 0.001}]  # not a reference
    with reference_layers(samples, "ort", repeat=2) as references:
        assert references.calibration_s == {name: 0.010}
        timed = references.time_s()
        assert list(timed) == [name] and timed[name] > 0
        assert references.speed_factor(timed) == pytest.approx(0.010 / timed[name])
    with reference_layers([], "ort") as none:
        assert none.time_s() == {} and none.speed_factor({}) is None
