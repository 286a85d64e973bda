"""How fast this host runs right now: a sub-second probe of its GEMM rate and its memory read bandwidth.

A calibrated profile prices kernels at the speed the host ran its micro-benchmarks. On a shared VM that
speed moves: on the Xeon of session 13 the same probe read 28.9 GB/s and 243 GFLOP/s, then 19.6 GB/s and
186 GFLOP/s two minutes later, and a prediction calibrated in one spell missed a measurement taken in the
other by 20-40 %. So calibration records the probe (``Profile.probe_*``) and a measurement on this host
takes it again before and after its runs; the report states how fast the host ran against calibration time,
which tells a host that slowed down from a cost model that is wrong. Predictions are never rescaled by it.

The probe times a 1024 x 1024 fp32 matmul (compute) and a sum over a buffer twice the last-level cache
(DRAM reads) on torch's threads, best of several runs each: like the calibration's lowest medians, the
fastest run is the host's speed and anything slower is its neighbours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Iterator

GEMM_SIZE = 1024
GEMM_RUNS = 6
READ_RUNS = 4
READ_CACHE_MULTIPLE = 2  # the buffer is this many times the last-level cache, so the sum reads DRAM
READ_MIN_BYTES = 64 * 2**20
READ_MAX_BYTES = 512 * 2**20
# Ratios within this much of 1 are the probe's own spread, not a change of the host's speed.
SPEED_NOTICE = 0.10


@dataclasses.dataclass(frozen=True)
class HostSpeed:
    gemm_flops_per_s: float
    read_bytes_per_s: float

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def faster(self, other: HostSpeed) -> HostSpeed:
        """Each rate at the larger of the two probes'."""
        return HostSpeed(max(self.gemm_flops_per_s, other.gemm_flops_per_s),
                         max(self.read_bytes_per_s, other.read_bytes_per_s))


def _best_s(run, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def probe_host_speed(cache_bytes: float | None = None) -> HostSpeed:
    """This host's GEMM FLOP/s and DRAM read bytes/s, now (about 0.3 s)."""
    import torch

    from tfcompile.cost_models.device import last_level_cache_bytes

    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    torch.mm(a, b)  # warm-up: thread pool and packing buffers
    gemm_s = _best_s(lambda: torch.mm(a, b), GEMM_RUNS)
    cache_bytes = cache_bytes or last_level_cache_bytes() or 0
    read_bytes = int(min(max(READ_CACHE_MULTIPLE * cache_bytes, READ_MIN_BYTES), READ_MAX_BYTES))
    buffer = torch.ones(read_bytes // 4)
    buffer.sum()
    read_s = _best_s(buffer.sum, READ_RUNS)
    return HostSpeed(2 * GEMM_SIZE**3 / gemm_s, buffer.numel() * 4 / read_s)


def speed_record(at_calibration: HostSpeed | None, before: HostSpeed, after: HostSpeed) -> dict:
    """The report's record of the probes around a measurement, and their ratios to calibration's."""
    record: dict = {"before_measuring": before.as_dict(), "after_measuring": after.as_dict()}
    if at_calibration is not None:
        record["at_calibration"] = at_calibration.as_dict()
        record["ratio_to_calibration"] = {
            field: [min(getattr(p, field) for p in (before, after)) / getattr(at_calibration, field),
                    max(getattr(p, field) for p in (before, after)) / getattr(at_calibration, field)]
            for field in ("gemm_flops_per_s", "read_bytes_per_s")}
    return record


def speed_text(record: dict) -> str:
    """One clause for a caption: how fast the host ran while measuring against when it was calibrated."""
    ratios = record.get("ratio_to_calibration")
    if not ratios:
        return ""
    gemm, read = ratios["gemm_flops_per_s"], ratios["read_bytes_per_s"]
    text = (f"host speed while measuring, against calibration: GEMM {_span(gemm)}, memory reads {_span(read)}")
    if any(abs(r - 1) > SPEED_NOTICE for r in (*gemm, *read)):
        text += " (the host ran at another speed than when calibrated: predictions miss by about as much)"
    return text


def _span(pair: list[float]) -> str:
    low, high = pair
    return f"{low:.2f}x" if abs(high - low) < 0.005 else f"{low:.2f}-{high:.2f}x"


@contextlib.contextmanager
def probes_around(enabled: bool) -> Iterator[list[HostSpeed]]:
    """Probe before and after the ``with`` body (a measurement on this host); the list holds both after it,
    nothing when not ``enabled`` (a remote device or a GPU measured)."""
    probes: list[HostSpeed] = []
    if enabled:
        probes.append(probe_host_speed())
    yield probes
    if enabled:
        probes.append(probe_host_speed())
