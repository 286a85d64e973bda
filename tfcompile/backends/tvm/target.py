"""The LLVM target for the machine tfcompile runs on.

TVM 0.27's wheel rejects ``-mcpu=native`` for its conda triple and silently
falls back to ``generic`` (no AVX2/AVX-512), and the CLI string form of a
target is no longer parsed at all, so the host target is built as a dict with
an explicit CPU name: LLVM's own host detection when it names a CPU the wheel
knows, checked against the SIMD flags the kernel reports in /proc/cpuinfo;
otherwise the x86-64 micro-architecture level those flags imply.
"""

from __future__ import annotations

import dataclasses
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


def host_target(*, reassociate: bool = True):
    """``tvm.target.Target`` for this CPU, with an explicit ``mcpu`` (never "native").

    ``reassociate``: LLVM may reorder float additions (``fast-math-reassoc``, nothing else of fast-math: no
    assumption of finite values, which masks of -inf need). Without it a reduction LLVM is left to vectorise
    (a row no vector width divides, where ``rules._factor_reduction`` does not apply) runs as a scalar chain,
    every add waiting on the one before: the local-attention tiles' masked softmax over 385 keys took 3.8 ms
    a layer on session 21's EPYC, 0.9 ms reassociated (``benchmarks/tvm_row_kernels.py --before
    reassociation --kernels``). Sums then round in another order (about 1e-7
    relative), as the factored ones do."""
    from tvm.target import Target

    spec = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": host_cores()}
    return Target({**spec, "fast-math-reassoc": True} if reassociate else spec)


def _has(target, feature: str) -> bool:
    from tvm.target import codegen

    try:
        return bool(codegen.llvm_cpu_has_features(feature, target))
    except Exception:  # noqa: BLE001  (a feature LLVM does not know for this triple)
        return False


def _is_aarch64(target) -> bool:
    from tvm.target import codegen

    attrs = target.attrs if target.attrs is not None else {}
    triple = str(attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    return triple.startswith(("aarch64", "arm64"))


@dataclasses.dataclass(frozen=True)
class VectorUnit:
    """A target's SIMD register file: ``registers`` architectural vector registers of ``width_bits``."""

    width_bits: int
    registers: int
    isa: str


def vector_unit(target) -> VectorUnit:
    """The SIMD register file ``target`` compiles for, from its LLVM features.

    LLVM's ``llvm_get_vector_width`` reports 512 bits for AVX2-only CPUs such as
    ``haswell`` in TVM 0.27, so the width is read from the feature set instead:
    AVX-512F: 32 × 512-bit (zmm0-31); AVX/AVX2: 16 × 256-bit (ymm0-15); SSE:
    16 × 128-bit; AArch64: 32 × 128-bit (NEON v0-31; SVE code is generated at
    fixed 128-bit width, TVM's vectorize emitting fixed-length vectors, so it
    counts as NEON). Other targets: LLVM's width, 16 registers.
    """
    from tvm.target import codegen

    if _is_aarch64(target):
        return VectorUnit(128, 32, "sve" if _has(target, "sve") else "neon")
    if _has(target, "avx512f"):
        return VectorUnit(512, 32, "avx512")
    if _has(target, "avx"):
        return VectorUnit(256, 16, "avx2" if _has(target, "avx2") else "avx")
    if _has(target, "sse2"):
        return VectorUnit(128, 16, "sse")
    width = codegen.llvm_get_vector_width(target)
    return VectorUnit(width if width and width > 0 else 128, 16, "generic")


def vector_lanes(target, dtype_bits: int = 32) -> int:
    """SIMD lanes of ``dtype_bits`` elements for ``target`` (at least 4)."""
    return max(vector_unit(target).width_bits // dtype_bits, 4)


@dataclasses.dataclass(frozen=True)
class Tile:
    """A matmul register tile: ``mr`` rows × ``nr`` columns of C held in vector registers over the K loop.

    Per step of K the micro-kernel loads ``nr / lanes`` vectors of B, broadcasts
    one element of A per row and issues ``mr * nr / lanes`` FMAs; all of those
    must be live at once, so ``registers_needed`` (accumulators + B vectors + one
    broadcast) must not exceed the register file or LLVM spills accumulators to
    the stack inside the hot loop.
    """

    mr: int
    nr: int
    lanes: int
    registers: int

    @property
    def vectors(self) -> int:
        return self.nr // self.lanes

    @property
    def registers_needed(self) -> int:
        return self.mr * self.vectors + self.vectors + 1

    @property
    def fits(self) -> bool:
        return self.registers_needed <= self.registers


# Independent accumulators an FMA pipeline needs to stay full: ~4 cycles latency × 2 FMA ports on
# every x86 core since Haswell and on Neoverse/Apple cores.
MIN_ACCUMULATORS = 8
# Accumulators a tile narrowed to divide M must keep (``tile_rows``): 4×64 on AVX-512 does, 4×16 on AVX2
# does not.
DIVISOR_MIN_ACCUMULATORS = 16
# Rows of a tile: more than this and the A broadcasts dominate the loads again.
MAX_MR = 8


def max_rows(vectors: int, registers: int) -> int:
    """The most rows of ``vectors`` accumulators each that fit ``registers`` with B and a broadcast."""
    return min(MAX_MR, (registers - vectors - 1) // vectors)


def choose_tile(lanes: int, registers: int) -> Tile:
    """The register tile for a vector unit of ``lanes`` × ``registers`` (pure, for tests and the rules).

    Panel widths of 2 and 4 vectors are candidates (powers of two, so they divide
    the transformer dimensions and the padded vocabularies); for each, the most
    rows that fit. The winner has at least MIN_ACCUMULATORS accumulators and the
    most FMAs per loaded vector (``mr·v / (mr + v)``); ties go to the narrower
    panel (fewer padded columns, more column tiles to run in parallel).
    AVX2 (16 × 8 lanes) gets 6×16, AVX-512 (32 × 16) 6×64, NEON (32 × 4) 6×16.
    ``nr`` is fixed per target (constant weights are packed in ``nr``-wide
    panels before the matmul's M is looked at); ``tile_rows`` then fits ``mr`` to M.
    """
    best, best_key = None, None
    for vectors in (2, 4):
        mr = max_rows(vectors, registers)
        if mr < 1:
            continue
        key = (mr * vectors >= MIN_ACCUMULATORS, mr * vectors / (mr + vectors), -vectors)
        if best_key is None or key > best_key:
            best, best_key = Tile(mr, vectors * lanes, lanes, registers), key
    if best is None:  # a register file too small for 2 vectors: one vector, one row
        best = Tile(1, lanes, lanes, registers)
    return best


def tile_rows(rows: int, vectors: int, registers: int) -> int:
    """``mr`` for a matmul of ``rows`` (M) rows and ``vectors``-vector panels.

    The most rows that fit the register file, or one row fewer when that divides
    M and the most does not (it spares the predicated last row tile), or, when
    the tail would hold more than half a tile, the most rows that divide M while
    keeping DIVISOR_MIN_ACCUMULATORS accumulators. Measured on session 18's
    AVX-512 Xeon (``benchmarks/tvm_matmul_rows.py --against-tail``: 768→768,
    2 threads, interleaved in one process): where 6 leaves 4 rows over (M = 256,
    1024, 4096) 4×64 tiles that divide M ran 1.20-1.39x faster than 6×64 with a
    tail; where it leaves 2 (M = 128, 512, 2048) they ran 0.91-0.97x, slower. On
    AVX2 the narrower tile keeps too few accumulators: 4×16 ran 107-113 GFLOP/s
    against 121-125 for 6×16 with a tail at M = 1024 (haswell build, same host),
    and 88 against 97 at M = 128 (an earlier host); 8×16 spills (64).
    """
    top = max(max_rows(vectors, registers), 1)
    if rows <= top:
        return max(rows, 1)
    if rows % top and top > 2 and rows % (top - 1) == 0:
        return top - 1
    if rows % top > top // 2:
        for mr in range(top - 2, 0, -1):
            if mr * vectors >= DIVISOR_MIN_ACCUMULATORS and rows % mr == 0:
                return mr
    return top


def register_tile(target, dtype_bits: int = 32) -> Tile:
    """``choose_tile`` for ``target``'s vector unit and ``dtype_bits`` elements."""
    return choose_tile(vector_lanes(target, dtype_bits), vector_unit(target).registers)
