"""Latency measurement shared by every backend.

A measurement is the median of repeated timed runs after warm-up, in this
process. ``measure_interleaved`` alternates between callables (baseline and
variants) so that drift in the machine's state hits all of them alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Measurement:
    backend: str
    median_s: float
    samples_s: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def spread(self) -> Spread:
        return Spread.of([s * 1e3 for s in self.samples_s])

    def as_dict(self) -> dict:
        return {"backend": self.backend, "median_ms": self.median_ms,
                "samples_ms": [s * 1e3 for s in self.samples_s]}


@dataclasses.dataclass(frozen=True)
class Spread:
    """How a set of timed runs (or ratios) spreads: median, p10-p90, min-max and the count."""
    median: float
    p10: float
    p90: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no samples")
        ordered = sorted(values)
        return cls(statistics.median(ordered), _quantile(ordered, 0.1), _quantile(ordered, 0.9), ordered[0],
                   ordered[-1], len(ordered))

    @property
    def relative_width(self) -> float:
        """(p90 - p10) / median: 0.1 means the middle 80 % of runs lie within 10 % of the median's size."""
        return (self.p90 - self.p10) / self.median if self.median else 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on sorted values."""
    position = q * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def ratio_spread(variant: Measurement, baseline: Measurement) -> Spread:
    """The variant/baseline ratio run by run: interleaved runs of the same turn share the machine's state,
    so their ratio is steadier than either time, and its p10-p90 says how sure the speed-up is."""
    pairs = list(zip(variant.samples_s, baseline.samples_s))
    return Spread.of([v / b for v, b in pairs if b > 0])


def measure(run: Callable[[], object], *, backend: str, warmup: int = 2, repeat: int = 10,
            max_total_s: float = 60.0) -> Measurement:
    """Median wall time of ``run()``; stops early (≥3 samples) once ``max_total_s`` is spent."""
    for _ in range(warmup):
        run()
    samples: list[float] = []
    spent = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        samples.append(elapsed)
        spent += elapsed
        if spent > max_total_s and len(samples) >= 3:
            break
    return Measurement(backend, statistics.median(samples), tuple(samples))


def measure_interleaved(runs: dict[str, Callable[[], object]], *, backend: str, warmup: int = 2,
                        repeat: int = 10, block: int = 1, max_total_s: float | None = None) -> dict[str, Measurement]:
    """Median per callable, timing them round-robin so they share the machine's state.

    ``block > 1``: each turn runs a callable ``block + 1`` times and times the
    last ``block``. Runtimes whose idle workers spin (ONNX Runtime: every
    session has its own thread pool) slow whatever runs right after them; the
    untimed first run of a turn absorbs that, and spinning stays on, which is
    how each runtime runs fastest and how a deployment runs it.

    ``max_total_s``: stop after the turn that spends it (at least 3 turns), so
    every callable keeps the same number of samples.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    turns = -(-repeat // block)
    started = time.perf_counter()
    for turn in range(turns):
        for name, run in runs.items():
            if block > 1:
                run()
            for _ in range(block):
                start = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - start)
        if max_total_s is not None and turn >= 2 and time.perf_counter() - started > max_total_s:
            break
    return {name: Measurement(backend, statistics.median(s), tuple(s)) for name, s in samples.items()}


# Timed runs per turn when ``measure_interleaved`` alternates between ONNX Runtime sessions.
ORT_BLOCK = 3
