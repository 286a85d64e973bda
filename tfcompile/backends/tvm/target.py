"""The LLVM target for the machine tfcompile runs on.

TVM 0.27's wheel rejects ``-mcpu=native`` for its conda triple and silently
falls back to ``generic`` (no AVX2/AVX-512), and the CLI string form of a
target is no longer parsed at all, so the host target is built as a dict with
an explicit CPU name: LLVM's own host detection when it names a CPU the wheel
knows, checked against the SIMD flags the kernel reports in /proc/cpuinfo;
otherwise the x86-64 micro-architecture level those flags imply.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

# x86-64 psABI levels, highest first: the flags each one needs (names as in /proc/cpuinfo).
_X86_LEVELS = (
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma"}),
    ("x86-64-v3", {"avx2", "fma", "bmi2", "movbe"}),
    ("x86-64-v2", {"sse4_2", "popcnt", "ssse3"}),
)
# LLVM feature names for the cpuinfo flags that decide the SIMD width.
_SIMD_FLAGS = {"avx512f": "avx512f", "avx2": "avx2", "fma": "fma"}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags of the first processor in /proc/cpuinfo (empty when unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _level_for(flags: set[str]) -> str:
    for name, needed in _X86_LEVELS:
        if needed <= flags:
            return name
    return "x86-64"


def choose_cpu(system_cpu: str, flags: set[str], *, valid, has_feature) -> str:
    """Pick the ``mcpu`` name: LLVM's detected CPU if valid and consistent with ``flags``.

    ``valid(cpu) -> bool`` and ``has_feature(cpu, feature) -> bool`` ask the
    wheel's LLVM; they are parameters so the choice can be tested without a host.
    """
    if system_cpu and system_cpu not in ("generic", "native") and valid(system_cpu):
        if not flags:
            return system_cpu
        # A CPU name whose SIMD features the kernel does not expose (VMs often
        # mask AVX-512) would emit illegal instructions; trust the flags then.
        consistent = all(has_feature(system_cpu, feat) == (flag in flags) for flag, feat in _SIMD_FLAGS.items())
        if consistent:
            return system_cpu
    level = _level_for(flags)
    return level if valid(level) else "x86-64"


@functools.lru_cache(maxsize=1)
def host_cpu() -> str:
    from tvm.target import Target, codegen

    triple = codegen.llvm_get_system_triple()

    def valid(cpu: str) -> bool:
        return bool(codegen.llvm_is_valid_cpu(cpu, triple))

    def has_feature(cpu: str, feature: str) -> bool:
        return bool(codegen.llvm_cpu_has_features(feature, Target({"kind": "llvm", "mcpu": cpu})))

    return choose_cpu(str(codegen.llvm_get_system_cpu()), cpu_flags(), valid=valid, has_feature=has_feature)


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_target():
    """``tvm.target.Target`` for this CPU, with an explicit ``mcpu`` (never "native")."""
    from tvm.target import Target

    return Target({"kind": "llvm", "mcpu": host_cpu(), "num-cores": host_cores()})


def vector_lanes(target, dtype_bits: int = 32) -> int:
    """SIMD lanes of ``dtype_bits`` elements for ``target`` (at least 4)."""
    from tvm.target import codegen

    width_bits = codegen.llvm_get_vector_width(target)
    if width_bits is None or width_bits <= 0:
        width_bits = 128
    return max(width_bits // dtype_bits, 4)
