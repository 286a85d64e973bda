"""Latency measurement shared by every backend.

A measurement is the median of repeated timed runs after warm-up, in this
process. ``measure_interleaved`` alternates between callables (baseline and
variants) so that drift in the machine's state hits all of them alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Measurement:
    backend: str
    median_s: float
    samples_s: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    def as_dict(self) -> dict:
        return {"backend": self.backend, "median_ms": self.median_ms,
                "samples_ms": [s * 1e3 for s in self.samples_s]}


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
                        repeat: int = 10, block: int = 1) -> dict[str, Measurement]:
    """Median per callable, timing them round-robin so they share the machine's state.

    ``block > 1``: each turn runs a callable ``block + 1`` times and times the
    last ``block``. Runtimes whose idle workers spin (ONNX Runtime: every
    session has its own thread pool) slow whatever runs right after them; the
    untimed first run of a turn absorbs that, and spinning stays on, which is
    how each runtime runs fastest and how a deployment runs it.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    turns = -(-repeat // block)
    for _ in range(turns):
        for name, run in runs.items():
            if block > 1:
                run()
            for _ in range(block):
                start = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - start)
    return {name: Measurement(backend, statistics.median(s), tuple(s)) for name, s in samples.items()}


# Timed runs per turn when ``measure_interleaved`` alternates between ONNX Runtime sessions.
ORT_BLOCK = 3
