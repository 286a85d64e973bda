import pytest

from tfcompile.compare import ComparisonRow, measured_speedup, score
from tfcompile.reference_speed import (REFERENCE_BENCHMARKS, at_calibration_speed, host_speed_factor, is_reference,
                                       reference_graphs)

SAMPLES = [{"name": "blocks_d512_l2_b1_s128", "measured_s": 0.010, "predicted_s": 0.011},
           {"name": "blocks_d640_l2_b1_s96", "measured_s": 0.020, "predicted_s": 0.019},
           {"name": "gelu_16384", "measured_s": 0.001, "predicted_s": 0.001}]


def _row(name, ms, predicted=None, runs=()):
    return ComparisonRow(name, ms, predicted or {"calibrated": ms}, (tuple(runs),) if runs else ())


def test_the_factor_is_calibration_time_over_time_now_of_the_reference_layers_only():
    rows = [_row("reference blocks_d512_l2_b1_s128", 20.0), _row("reference blocks_d640_l2_b1_s96", 25.0),
            _row("reference blocks_d256_l4_b4_s256", 99.0),  # not in the profile: no calibration time to compare
            _row("bert-base b1 s128 baseline", 500.0)]
    # 10/20 and 20/25: the host ran the same layers at half and at 0.8 of calibration speed.
    assert host_speed_factor(rows, SAMPLES) == pytest.approx((0.5 + 0.8) / 2)
    assert [is_reference(r) for r in rows] == [True, True, True, False]
    assert host_speed_factor([_row("bert-base b1 s128 baseline", 5.0)], SAMPLES) is None


def test_times_at_calibration_speed_keep_every_speed_up_and_fix_a_uniform_slowdown():
    baseline = _row("m baseline", 200.0, {"calibrated": 100.0}, runs=(210.0, 200.0, 190.0))
    variant = _row("m cleanup", 100.0, {"calibrated": 50.0}, runs=(105.0, 100.0, 95.0))
    steadied = at_calibration_speed([baseline, variant], 0.5)
    assert [r.measured_ms for r in steadied] == [100.0, 50.0]
    assert steadied[0].samples_ms == ((105.0, 100.0, 95.0),)
    assert measured_speedup(steadied[1], steadied[0]) == pytest.approx(measured_speedup(variant, baseline))
    assert score([baseline, variant])["calibrated"]["mape"] == pytest.approx(0.5)
    assert score(steadied)["calibrated"]["mape"] == pytest.approx(0.0)


def test_reference_graphs_are_the_recorded_calibration_layers_rebuilt():
    graphs = reference_graphs(SAMPLES)
    assert [g.name for g in graphs] == ["reference blocks_d512_l2_b1_s128", "reference blocks_d640_l2_b1_s96"]
    assert all(g.name.split(" ", 1)[1] in REFERENCE_BENCHMARKS for g in graphs)
    assert reference_graphs([]) == []
