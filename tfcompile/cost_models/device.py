"""Device specs, kept as TOML data files under ``devices/``.

``cpu`` is this host: its peak is detected from /proc/cpuinfo (cores, clock,
SIMD width) and overrides the file's placeholder peaks.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from importlib import resources
from pathlib import Path

from tfcompile.errors import UnknownTargetError

OP_CLASSES = ("gemm", "attention", "memory", "norm", "softmax")


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    name: str
    description: str
    kind: str
    peak_flops: dict[str, float]  # FLOP/s per dtype name
    mem_bandwidth_bytes_per_s: float
    kernel_overhead_s: float
    efficiency: dict[str, float]
    overhead_per: str = "kernel"  # "kernel", or "graph" for whole-graph NPU runtimes
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    # Runtimes without a fused attention kernel write the B·H·Sq·Sk score tensor and read it
    # back op by op; once it outgrows the last-level cache every pass goes to DRAM.
    attention_score_passes: float = 0.0  # 0: fused (flash) attention, scores never leave the chip
    cache_bytes: float = 0.0

    def peak_for(self, dtype: str) -> float:
        peak = self.peak_flops.get(dtype, 0.0)
        # Devices without an fp32 path (NPUs) run fp32 graphs at their fp16 rate.
        return peak if peak > 0 else self.peak_flops.get("fp16", 0.0) or max(self.peak_flops.values())


def _devices_dir() -> Path:
    return Path(str(resources.files("tfcompile.cost_models") / "devices"))


def device_file(name: str) -> Path:
    """The TOML file of a known target (``load_device`` has checked the name)."""
    return _devices_dir() / f"{name}.toml"


def available_targets() -> list[str]:
    return sorted(p.stem for p in _devices_dir().glob("*.toml"))


def load_device(name: str) -> DeviceSpec:
    path = _devices_dir() / f"{name}.toml"
    if not path.is_file():
        raise UnknownTargetError(f"unknown target {name!r}; known targets: {', '.join(available_targets())}")
    with path.open("rb") as f:
        data = tomllib.load(f)
    spec = DeviceSpec(
        name=data["name"],
        description=data["description"],
        kind=data["kind"],
        peak_flops={k: float(v) * 1e12 for k, v in data["peak_tflops"].items()},
        mem_bandwidth_bytes_per_s=float(data["mem_bandwidth_gbps"]) * 1e9,
        kernel_overhead_s=float(data["kernel_overhead_us"]) * 1e-6,
        efficiency={k: float(data["efficiency"][k]) for k in OP_CLASSES},
        overhead_per=data.get("overhead_per", "kernel"),
        sources=dict(data.get("sources", {})),
        attention_score_passes=float(data.get("attention", {}).get("score_passes", 0.0)),
        cache_bytes=float(data.get("attention", {}).get("cache_mb", 0.0)) * 2**20,
    )
    if name == "cpu":
        spec = _with_host_peaks(spec)
    return spec


@dataclasses.dataclass(frozen=True)
class HostCpu:
    model: str
    cores: int
    clock_hz: float
    flags: frozenset[str]

    @property
    def fp32_flops_per_cycle(self) -> int:
        # Two FMA pipes of the widest vector. Zen 4 double-pumps 512-bit FMAs
        # (half this rate); calibration, not this table, settles that.
        if "avx512f" in self.flags:
            return 64
        if "avx2" in self.flags and "fma" in self.flags:
            return 32
        return 8


def detect_host() -> HostCpu:
    model, clock_mhz, flags = "unknown", 2000.0, frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model == "unknown":
            model = value
        elif key == "cpu MHz":
            clock_mhz = float(value)
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return HostCpu(model, cores, clock_mhz * 1e6, flags)


def _with_host_peaks(spec: DeviceSpec) -> DeviceSpec:
    host = detect_host()
    fp32 = host.cores * host.clock_hz * host.fp32_flops_per_cycle
    peaks = {"fp32": fp32, "fp16": fp32, "bf16": fp32 * (2 if "avx512_bf16" in host.flags else 1),
             "int8": fp32 * (4 if "avx512_vnni" in host.flags else 2)}
    cache = last_level_cache_bytes()
    return dataclasses.replace(spec, description=f"{host.model}, {host.cores} cores at {host.clock_hz / 1e9:.2f} GHz",
                               peak_flops=peaks, cache_bytes=cache or spec.cache_bytes)


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> float:
    """The largest cache sysfs lists for CPU 0 (0 when it lists none)."""
    sizes = []
    for index in root.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text[-1:] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return float(max(sizes, default=0))
