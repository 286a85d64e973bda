import dataclasses
import json

import pytest

from tfcompile.cost_models.calibration import CLASSES, Profile
from tfcompile.cost_models.host_speed import (HostSpeed, probe_host_speed, probes_around, speed_record, speed_text)
from tfcompile.errors import TfcompileError

CALIBRATED = HostSpeed(gemm_flops_per_s=200e9, read_bytes_per_s=20e9)


def _profile(**fields) -> Profile:
    return Profile(target="cpu", backend="ort", s_per_flop={c: 1e-12 for c in CLASSES},
                   s_per_byte={c: 1e-11 for c in CLASSES}, kernel_overhead_s=1e-6, graph_overhead_s=1e-5, **fields)


def test_the_probe_measures_this_host():
    speed = probe_host_speed(cache_bytes=1)  # the smallest buffer: 64 MiB
    # Any CPU that runs the suite does more than 1 GFLOP/s and reads more than 0.5 GB/s; none does 100 TFLOP/s.
    assert 1e9 < speed.gemm_flops_per_s < 1e14
    assert 0.5e9 < speed.read_bytes_per_s < 1e13


def test_probes_bracket_a_measurement_on_this_host_only():
    with probes_around(True) as probes:
        assert len(probes) == 1  # taken before the body runs
    assert len(probes) == 2
    with probes_around(False) as probes:
        pass
    assert probes == []


def test_ratios_to_calibration_span_both_probes_and_a_slow_host_is_named():
    before = HostSpeed(150e9, 20e9)
    after = HostSpeed(170e9, 20e9)
    record = speed_record(CALIBRATED, before, after)
    assert record["ratio_to_calibration"]["gemm_flops_per_s"] == pytest.approx([0.75, 0.85])
    assert record["ratio_to_calibration"]["read_bytes_per_s"] == pytest.approx([1.0, 1.0])
    text = speed_text(record)
    assert "GEMM 0.75-0.85x" in text and "memory reads 1.00x" in text
    assert "another speed than when calibrated" in text
    steady = speed_text(speed_record(CALIBRATED, HostSpeed(195e9, 21e9), HostSpeed(205e9, 19e9)))
    assert "GEMM 0.97-1.02x" in steady and "another speed" not in steady


def test_the_caption_says_the_speed_only_when_probes_and_a_calibrated_speed_exist():
    from tfcompile.reference_speed import HostReadings

    provenance = {"kind": "calibrated", "text": "calibrated profile cpu/ort"}
    assert HostReadings().annotate(provenance) == provenance  # nothing measured here
    probes = [HostSpeed(100e9, 10e9), HostSpeed(100e9, 10e9)]
    annotated = HostReadings(speed_record(CALIBRATED, *probes)).annotate(provenance)
    assert annotated["text"].startswith("calibrated profile cpu/ort; host speed while measuring")
    assert annotated["host_speed"]["before_measuring"] == {"gemm_flops_per_s": 100e9, "read_bytes_per_s": 10e9}
    uncalibrated = HostReadings(speed_record(None, *probes)).annotate({"kind": "roofline", "text": "roofline"})
    assert uncalibrated["text"] == "roofline" and "ratio_to_calibration" not in uncalibrated["host_speed"]


def test_a_profile_keeps_its_calibration_speed_and_older_profiles_load_without_one():
    recorded = _profile(probe_gemm_flops_per_s=CALIBRATED.gemm_flops_per_s,
                        probe_read_bytes_per_s=CALIBRATED.read_bytes_per_s)
    assert Profile.from_json(recorded.to_json()).host_speed == CALIBRATED
    older = json.loads(_profile().to_json())
    for key in ("probe_gemm_flops_per_s", "probe_read_bytes_per_s"):
        del older[key]
    assert Profile.from_json(json.dumps(older)).host_speed is None
    broken = json.loads(recorded.to_json())
    broken["probe_read_bytes_per_s"] = -1
    with pytest.raises(TfcompileError, match="probe_read_bytes_per_s must be a finite number"):
        Profile.from_json(json.dumps(broken))
    assert dataclasses.replace(recorded, probe_read_bytes_per_s=0.0).host_speed is None
