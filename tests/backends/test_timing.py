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
