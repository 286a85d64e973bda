"""Device specs, kept as TOML data files under ``devices/``.

``cpu`` is this host: its peak is detected from /proc/cpuinfo (cores, clock,
SIMD width) and overrides the file's placeholder peaks.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
from importlib import resources
from pathlib import Path

from tfcompile.errors import DeviceSpecError, UnknownTargetError

OP_CLASSES = ("gemm", "attention", "memory", "norm", "softmax")

# The instruction-set extensions that decide kernel speed on x86 and Arm hosts: a figure measured with one set
# does not transfer to a host without it.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16", "amx_int8", "asimd", "asimddp", "sve", "sve2")
# The extensions a host's identity names (``host_identity``). Fixed: adding one here would change the
# identity of hosts that have it and orphan their saved calibration profiles.
IDENTITY_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
                  "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "sve2")


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
    # The level-2 caches of the cores a run uses, summed (detected for the host; 0 elsewhere): a memory-bound
    # kernel whose tensors outgrow them streams from the last-level cache (cache_spill).
    core_cache_bytes: float = 0.0
    # The CPU's instruction-set extensions among ISA_FLAGS (detected for the host; empty for other devices):
    # what decides whether int8 or bf16 arithmetic is faster than fp32 there.
    isa: frozenset[str] = frozenset()

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


@functools.lru_cache(maxsize=None)
def known_device(name: str) -> DeviceSpec | None:
    """The packaged device ``name``, or None where there is none (a profile of a remote or custom target)."""
    return load_device(name) if name in available_targets() else None


def load_device(name: str) -> DeviceSpec:
    """The spec of a known target. A target is a name from ``devices/``, never a path."""
    known = available_targets()
    # Only exact names of the shipped files: "--target ../../etc/x" must not reach the filesystem.
    if not isinstance(name, str) or name not in known:
        raise UnknownTargetError(f"unknown target {name!r}; known targets: {', '.join(known)} "
                                 "(see `tfcompile targets`)")
    spec = device_from_toml(device_file(name))
    if name == "cpu":
        spec = _with_host_peaks(spec)
    return spec


# A device file is a few dozen lines; a larger one is not a device file and is not read into memory.
MAX_DEVICE_FILE_BYTES = 1 << 20


def device_from_toml(path: Path) -> DeviceSpec:
    """Read and validate one device file; each missing or mistyped field is one clear error."""
    path = Path(path)
    try:
        if not path.is_file():
            raise DeviceSpecError(f"{path}: not a file; a device file is a TOML file like those `tfcompile "
                                  "targets` lists")
        if path.stat().st_size > MAX_DEVICE_FILE_BYTES:
            raise DeviceSpecError(f"{path}: {path.stat().st_size} bytes is too large for a device file "
                                  f"(at most {MAX_DEVICE_FILE_BYTES})")
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise DeviceSpecError(f"{path}: cannot read device file: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DeviceSpecError(f"{path}: not valid TOML: {exc}") from exc
    field = _FieldReader(path, data)
    field.only(DEVICE_FIELDS)
    field.number("memory_gb", positive=True, default=1.0)  # documentation only, but a number
    efficiency = field.table("efficiency")
    _FieldReader(path, efficiency, "efficiency").only(OP_CLASSES)
    attention = field.table("attention", required=False)
    _FieldReader(path, attention, "attention").only(ATTENTION_FIELDS)
    return DeviceSpec(
        name=field.text("name"),
        description=field.text("description"),
        kind=field.choice("kind", DEVICE_KINDS),
        peak_flops={k: v * 1e12 for k, v in field.numbers("peak_tflops").items()},
        mem_bandwidth_bytes_per_s=field.number("mem_bandwidth_gbps", positive=True) * 1e9,
        kernel_overhead_s=field.number("kernel_overhead_us") * 1e-6,
        efficiency={k: _FieldReader(path, efficiency, "efficiency").number(k, positive=True, at_most=1.0)
                    for k in OP_CLASSES},
        overhead_per=field.choice("overhead_per", OVERHEAD_UNITS, default="kernel"),
        sources=field.texts("sources", required=False),
        attention_score_passes=_FieldReader(path, attention, "attention").number("score_passes", default=0.0),
        cache_bytes=_FieldReader(path, attention, "attention").number("cache_mb", default=0.0) * 2**20,
    )


DEVICE_KINDS = ("cpu", "gpu", "npu", "edge")
DEVICE_FIELDS = ("name", "description", "kind", "memory_gb", "mem_bandwidth_gbps", "kernel_overhead_us",
                 "overhead_per", "peak_tflops", "efficiency", "attention", "sources")
ATTENTION_FIELDS = ("score_passes", "cache_mb")
OVERHEAD_UNITS = ("kernel", "graph")
_MISSING = object()


class _FieldReader:
    """Typed access to a device file's fields: one error per missing or mistyped field, naming it."""

    def __init__(self, path: Path, data: dict, table: str | None = None):
        self.path, self.data, self.prefix = path, data, f"{table}." if table else ""

    def _fail(self, key: str, expected: str, value: object = _MISSING) -> DeviceSpecError:
        found = "missing" if value is _MISSING else f"{type(value).__name__} {value!r}"
        return DeviceSpecError(f"{self.path}: field {self.prefix}{key} must be {expected}; found {found}")

    def _get(self, key: str, expected: str, default: object = _MISSING) -> object:
        value = self.data.get(key, default)
        if value is _MISSING:
            raise self._fail(key, expected)
        return value

    def text(self, key: str) -> str:
        value = self._get(key, "a string")
        if not isinstance(value, str) or not value:
            raise self._fail(key, "a non-empty string", value)
        return value

    def choice(self, key: str, options: tuple[str, ...], default: object = _MISSING) -> str:
        expected = "one of " + ", ".join(repr(o) for o in options)
        value = self._get(key, expected, default)
        if value not in options:
            raise self._fail(key, expected, value)
        return value

    def number(self, key: str, *, positive: bool = False, at_most: float | None = None,
               default: object = _MISSING) -> float:
        expected = ("a number > 0" if positive else "a number >= 0") + (f" and <= {at_most:g}" if at_most else "")
        value = self._get(key, expected, default)
        # bool is an int in Python; a TOML true is no number; NaN and inf compare false below.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, expected, value)
        ok = (value > 0 if positive else value >= 0) and value < float("inf") and (at_most is None or value <= at_most)
        if not ok:
            raise self._fail(key, expected, value)
        return float(value)

    def only(self, known: tuple[str, ...]) -> None:
        """A field nobody reads is most often a misspelt one: say so instead of using a default."""
        for key in self.data:
            if key not in known:
                raise DeviceSpecError(f"{self.path}: unknown field {self.prefix}{key}; known fields: "
                                      f"{', '.join(self.prefix + k for k in known)}")

    def table(self, key: str, *, required: bool = True) -> dict:
        value = self._get(key, "a table", _MISSING if required else {})
        if not isinstance(value, dict):
            raise self._fail(key, "a table", value)
        return value

    def numbers(self, key: str) -> dict[str, float]:
        table = self.table(key)
        reader = _FieldReader(self.path, table, key)
        values = {k: reader.number(k) for k in table}
        if not any(v > 0 for v in values.values()):
            raise self._fail(key, "a table with at least one peak > 0", table)
        return values

    def texts(self, key: str, *, required: bool = True) -> dict[str, str]:
        table = self.table(key, required=required)
        reader = _FieldReader(self.path, table, key)
        return {k: reader.text(k) for k in table}


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


def cpu_peaks(host: HostCpu) -> dict[str, float]:
    """FLOP/s per dtype on ``host``: a dtype is faster than fp32 only with instructions that do its arithmetic.

    int8: VNNI / AMX-INT8 multiply-accumulate four int8 pairs per 32-bit lane (4x fp32); without
    them ONNX Runtime's int8 measured 0.95-1.02x fp32 on an AVX2 host, so no gain is assumed.
    bf16: AVX512_BF16 / AMX-BF16 dot products (2x); fp16: AVX512_FP16 / AMX-FP16 (2x). Otherwise
    the half types are converted and computed as fp32.
    """
    fp32 = host.cores * host.clock_hz * host.fp32_flops_per_cycle
    has = host.flags.__contains__
    return {"fp32": fp32,
            "fp16": fp32 * (2 if has("avx512_fp16") or has("amx_fp16") else 1),
            "bf16": fp32 * (2 if has("avx512_bf16") or has("amx_bf16") else 1),
            "int8": fp32 * (4 if has("avx512_vnni") or has("avx_vnni") or has("amx_int8") else 1)}


def _with_host_peaks(spec: DeviceSpec) -> DeviceSpec:
    host = detect_host()
    cache = last_level_cache_bytes()
    return dataclasses.replace(spec, description=f"{host.model}, {host.cores} cores at {host.clock_hz / 1e9:.2f} GHz",
                               peak_flops=cpu_peaks(host), cache_bytes=cache or spec.cache_bytes,
                               core_cache_bytes=host.cores * cache_bytes_at_level(2),
                               isa=frozenset(flag for flag in ISA_FLAGS if flag in host.flags))


CPU0_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def _cache_sizes(root: Path) -> list[tuple[str, int]]:
    """(level, bytes) of every cache sysfs lists for CPU 0."""
    sizes = []
    for index in root.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            level = (index / "level").read_text().strip() if (index / "level").exists() else ""
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text[-1:] in units and text[:-1].isdigit():
            sizes.append((level, int(text[:-1]) * units[text[-1]]))
        elif text.isdigit():
            sizes.append((level, int(text)))
    return sizes


def last_level_cache_bytes(root: Path = CPU0_CACHES) -> float:
    """The largest cache sysfs lists for CPU 0 (0 when it lists none)."""
    return float(max((size for _, size in _cache_sizes(root)), default=0))


def cache_bytes_at_level(level: int, root: Path = CPU0_CACHES) -> float:
    """CPU 0's cache of ``level`` (its largest, if several), 0 when sysfs lists none."""
    return float(max((size for lvl, size in _cache_sizes(root) if lvl == str(level)), default=0))


def host_identity() -> str:
    """What a calibration on this host depends on: CPU model, usable cores, ISA extensions, last-level cache.

    Two hosts with the same identity run the same kernels at about the same speed; a profile fitted on one
    identity is refused on another (the same model name with and without AVX-512 is two identities)."""
    host = detect_host()
    isa = ",".join(flag for flag in IDENTITY_FLAGS if flag in host.flags) or "none"
    return f"{host.model}; {host.cores} cores; {isa}; LLC {int(last_level_cache_bytes())} B"
