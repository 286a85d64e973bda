import pytest

from tfcompile.compare import ComparisonRow, measured_speedup, score
from tfcompile.reference_speed import (REFERENCE_BENCHMARKS, at_calibration_speed, readings_around, reference_layers,
                                      speed_factor)


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


def _one_ms_profile(target="cpu", samples=()):
    from tfcompile.cost_models.calibration import CLASSES, Profile

    # Every kernel at 1 ms: a prediction that does not depend on the host.
    return Profile(target=target, backend="ort", s_per_flop=dict.fromkeys(CLASSES, 0.0),
                   s_per_byte=dict.fromkeys(CLASSES, 0.0), kernel_overhead_s=1e-3, graph_overhead_s=0.0,
                   samples=list(samples))


def _calibrated(profile):
    from tfcompile.cost_models.device import load_device
    from tfcompile.cost_models.model import CalibratedCostModel

    return CalibratedCostModel(load_device(profile.target), profile.backend, profile)


def test_readings_around_time_the_references_and_probe_the_host_after_the_body_has_run():
    name = REFERENCE_BENCHMARKS[0]
    cost_model = _calibrated(_one_ms_profile(samples=[{"name": name, "measured_s": 0.010, "predicted_s": 0.010}]))
    with readings_around(cost_model, on_this_host=True) as readings:
        assert readings.host_speed is None and readings.reference_speed is None  # nothing read until the end
    timed = readings.reference_speed
    assert set(timed["before_s"]) == set(timed["after_s"]) == {name}
    assert readings.factor == pytest.approx(0.010 / min(timed["before_s"][name], timed["after_s"][name]))
    assert set(readings.host_speed) == {"before_measuring", "after_measuring"}
    annotated = readings.annotate({"kind": "calibrated", "text": "calibrated profile cpu/ort"})
    assert annotated["reference_speed"] is timed and annotated["host_speed"] is readings.host_speed
    assert annotated["text"] == (f"calibrated profile cpu/ort; calibration's own layer stacks ran at "
                                 f"{readings.factor:.2f}x of their calibration speed around the measurement")


@pytest.mark.parametrize("target,on_this_host", [("cpu", False), ("edge", True)])
def test_no_readings_of_another_machine(target, on_this_host):
    """A measurement on a remote device is not this host's speed, and a profile of another target (calibrated
    on a board) recorded that board's times: neither is timed against this host's reference layers."""
    profile = _one_ms_profile(target, [{"name": REFERENCE_BENCHMARKS[0], "measured_s": 0.010, "predicted_s": 0.010}])
    with readings_around(_calibrated(profile), on_this_host=on_this_host) as readings:
        pass
    assert readings.reference_speed is None
    assert (readings.host_speed is not None) == on_this_host
    if not on_this_host:
        assert readings.annotate({"kind": "calibrated", "text": "t"}) == {"kind": "calibrated", "text": "t"}


def test_optimize_measure_reports_the_reference_layers_around_its_measurement(tmp_path, monkeypatch):
    """``optimize --measure`` with a calibrated profile states how fast the host ran calibration's own layers
    around its timed runs, in report.json (valid against its schema) and in the caption's text."""
    import json

    import jsonschema

    import tfcompile
    from tfcompile.cost_models.calibration import save_profile
    from tfcompile.report import schema

    monkeypatch.setenv("TFCOMPILE_PROFILE_DIR", str(tmp_path / "profiles"))
    save_profile(_one_ms_profile(samples=[{"name": REFERENCE_BENCHMARKS[0], "measured_s": 0.010,
                                           "predicted_s": 0.010}]))
    outcome = tfcompile.optimize_model("tests.tiny:bert", tmp_path / "out", target="cpu", measure=True,
                                       measure_top=0, repeat=2)
    report = json.loads(outcome.report_path.read_text())
    jsonschema.validate(report, schema())
    prediction = report["prediction"]
    assert prediction["kind"] == "calibrated" and prediction["reference_speed"]["factor"] > 0
    assert set(prediction["reference_speed"]["calibration_s"]) == {REFERENCE_BENCHMARKS[0]}
    assert "calibration's own layer stacks ran at" in prediction["text"]
