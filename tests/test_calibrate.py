"""The CPU calibration suite: rounds over the suite keep each benchmark's lowest median, and a benchmark whose
rounds disagree is timed again."""

import pytest
import torch

import tfcompile.calibrate as calibrate
from tfcompile import micro_models
from tfcompile.backends.timing import Measurement


def _suite(*widths):
    return [calibrate.MicroBenchmark(f"linear_{n}", lambda n=n: (micro_models.Linear(8, n), (torch.randn(2, 8),)))
            for n in widths]


def _scripted_measure(monkeypatch, medians_s):
    """``measure`` answering ``medians_s`` in order, each call running the lowered model; the calls made."""
    medians, calls = iter(medians_s), []

    def fake_measure(run, *, backend, warmup, repeat, max_total_s):
        run()  # the lowered model of round 1, still runnable in later rounds
        calls.append(backend)
        median = next(medians)
        return Measurement(backend, median, (median,))

    monkeypatch.setattr(calibrate, "measure", fake_measure)
    return calls


def test_each_benchmark_keeps_the_lowest_median_of_its_rounds(monkeypatch):
    """A burst of load on a shared host slows one round; the benchmark's figure comes from the quieter one."""
    calls = _scripted_measure(monkeypatch, [3e-3, 1e-3,   # round 1: the first benchmark in a burst
                                            1e-3, 2e-3])  # round 2: the burst moved to the second
    samples = calibrate.run_suite(_suite(4, 16), "ort", repeat=1, rounds=2, extra_rounds=0)
    assert [s.name for s in samples] == ["linear_4", "linear_16"]
    assert [s.measured_s for s in samples] == [1e-3, 1e-3]
    assert calls == ["ort"] * 4
    assert all(s.graph.call_nodes() for s in samples)


def test_a_benchmark_whose_rounds_disagree_is_timed_again_until_two_agree(monkeypatch):
    """Only the benchmark slowed in one of its two rounds runs again; a third round that agrees with its faster
    one ends it, and a fourth is never needed."""
    calls = _scripted_measure(monkeypatch, [1.0e-3, 3.0e-3,   # round 1
                                            1.03e-3, 2.0e-3,  # round 2: the first agrees, the second does not
                                            2.1e-3])          # again, the second only: it agrees with 2.0e-3
    samples = calibrate.run_suite(_suite(4, 16), "ort", repeat=1, rounds=2, extra_rounds=2)
    assert [s.measured_s for s in samples] == [1.0e-3, 2.0e-3]
    assert len(calls) == 5


def test_extra_rounds_stop_at_their_limit(monkeypatch):
    """A benchmark that never settles is timed ``extra_rounds`` more times, no more, and keeps its lowest."""
    calls = _scripted_measure(monkeypatch, [1e-3, 2e-3, 4e-3, 8e-3])
    samples = calibrate.run_suite(_suite(4), "ort", repeat=1, rounds=2, extra_rounds=2)
    assert [s.measured_s for s in samples] == [1e-3]
    assert len(calls) == 4


@pytest.mark.parametrize(("medians_s", "agree"), [([1.0], True), ([1.0, 1.08], True), ([1.09, 1.0], False),
                                                   ([2.0, 1.0, 1.05], True), ([1.0, 1.2, 1.3], False)])
def test_rounds_agree_compares_the_two_lowest_medians(medians_s, agree):
    assert calibrate.rounds_agree(medians_s) is agree
