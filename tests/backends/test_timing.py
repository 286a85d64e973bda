"""Round-robin timing: turns, blocks and the untimed run that absorbs the previous runtime's spinning."""

from tfcompile.backends.runner import interleave_block
from tfcompile.backends.timing import measure_interleaved


def _recorder(log, name):
    return lambda: log.append(name)


def test_run_by_run_alternation_by_default():
    log = []
    result = measure_interleaved({"a": _recorder(log, "a"), "b": _recorder(log, "b")}, backend="torch", warmup=0,
                                 repeat=3)
    assert log == ["a", "b"] * 3
    assert [len(m.samples_s) for m in result.values()] == [3, 3]


def test_blocks_time_the_runs_after_an_untimed_one():
    log = []
    result = measure_interleaved({"a": _recorder(log, "a"), "b": _recorder(log, "b")}, backend="ort", warmup=1,
                                 repeat=6, block=3)
    # warm-up once each, then two turns of (1 untimed + 3 timed) per callable
    assert log == ["a", "b"] + (["a"] * 4 + ["b"] * 4) * 2
    assert [len(m.samples_s) for m in result.values()] == [6, 6]


def test_only_ort_sessions_are_timed_in_blocks():
    assert interleave_block("ort") > 1
    assert interleave_block("tvm") == 1 and interleave_block("torch") == 1


def test_spread_quantiles_match_numpy():
    import numpy as np

    from tfcompile.backends.timing import Spread

    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.0]
    spread = Spread.of(values)
    assert spread.median == 4.0 and spread.low == 1.0 and spread.high == 10.0 and spread.runs == 7
    assert spread.p10 == np.quantile(values, 0.1) and spread.p90 == np.quantile(values, 0.9)
    assert Spread.of([10.0, 10.2, 10.1, 9.9]).relative_width < 0.03
    assert Spread.of([10.0, 14.0, 10.1, 9.0, 16.0]).relative_width > 0.4


def test_ratio_pairs_runs_of_the_same_turn():
    from tfcompile.backends.timing import Measurement, ratio_spread

    # The machine slows down 3x in the middle turns; the ratio, run by run, does not move.
    baseline = Measurement("ort", 0.0, (1.0, 3.0, 3.0, 1.0))
    variant = Measurement("ort", 0.0, (0.5, 1.5, 1.5, 0.5))
    ratio = ratio_spread(variant, baseline)
    assert ratio.median == ratio.p10 == ratio.p90 == 0.5


def test_time_budget_stops_after_whole_turns(monkeypatch):
    from tfcompile.backends import timing

    clock = iter(float(i) for i in range(10_000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    log = []
    result = measure_interleaved({"a": _recorder(log, "a"), "b": _recorder(log, "b")}, backend="torch", warmup=0,
                                 repeat=100, max_total_s=1.0)
    # At least three turns, and every callable keeps the same number of samples.
    assert [len(m.samples_s) for m in result.values()] == [3, 3]
