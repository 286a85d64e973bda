"""The matmul register tile is derived from the target's register file (issue 21).

An AVX2 core has 16 vector registers of 8 floats, an AVX-512 core 32 of 16,
an AArch64 core 32 of 4 (NEON; SVE is compiled at fixed 128-bit width): the
tile must fit each, and the matmul rule's schedule must compile for each.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import te  # noqa: E402
from tvm.target import Target  # noqa: E402

from tfcompile.backends.tvm import lowering  # noqa: E402
from tfcompile.backends.tvm.rules import schedule_func  # noqa: E402
from tfcompile.backends.tvm.target import (  # noqa: E402
    MIN_ACCUMULATORS,
    Tile,
    choose_tile,
    cpu_flags,
    max_rows,
    register_tile,
    tile_rows,
    vector_lanes,
    vector_unit,
)
from tfcompile.graph import export_module  # noqa: E402

# target, (vector bits, registers), runnable on an x86 host with these cpuinfo flags (None: compile only)
TARGETS = {
    "haswell": ({"kind": "llvm", "mcpu": "haswell"}, (256, 16), {"avx2", "fma"}),
    "znver2": ({"kind": "llvm", "mcpu": "znver2"}, (256, 16), {"avx2", "fma"}),
    "skylake-avx512": ({"kind": "llvm", "mcpu": "skylake-avx512"}, (512, 32), {"avx512f", "avx512bw", "avx512vl"}),
    "znver4": ({"kind": "llvm", "mcpu": "znver4"}, (512, 32), {"avx512f", "avx512bw", "avx512vl"}),
    "aarch64-neon": ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, (128, 32), None),
    "aarch64-sve": ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+sve"]}, (128, 32), None),
}


@pytest.mark.parametrize("lanes,registers,expected", [
    (8, 16, (6, 16)),   # AVX2: 12 accumulators + 2 B vectors + 1 broadcast = 15 of 16
    (16, 32, (6, 64)),  # AVX-512: 24 + 4 + 1 = 29 of 32
    (4, 32, (6, 16)),   # NEON: 24 + 4 + 1 = 29 of 32
    (4, 16, (6, 8)),    # SSE: 12 + 2 + 1 = 15 of 16
])
def test_chosen_tile_fits_the_register_file(lanes, registers, expected):
    tile = choose_tile(lanes, registers)
    assert (tile.mr, tile.nr) == expected
    assert tile.fits and tile.registers_needed <= registers
    assert tile.mr * tile.vectors >= MIN_ACCUMULATORS  # enough independent FMAs to fill the pipes
    # The tile the rules used before issue 21 on an AVX2 target (LLVM reports 512 bits for haswell):
    # 8 rows × 32 columns = 32 ymm accumulators, twice the register file.
    assert not Tile(8, 32, 8, 16).fits


@pytest.mark.parametrize("rows", [1, 2, 5, 17, 64, 128, 197, 256, 50257])
@pytest.mark.parametrize("lanes,registers", [(8, 16), (16, 32), (4, 32)])
def test_rows_fitted_to_m_never_overflow_the_register_file(rows, lanes, registers):
    tile = choose_tile(lanes, registers)
    mr = tile_rows(rows, tile.vectors, registers)
    assert 1 <= mr <= max(max_rows(tile.vectors, registers), 1)
    assert Tile(mr, tile.nr, lanes, registers).fits
    assert mr <= rows


@pytest.mark.parametrize("rows,vectors,registers,expected", [
    (1024, 4, 32, 4),  # AVX-512: 6 leaves 4 rows over, 5 does not divide, 4x64 divides with 16 accumulators
    (4096, 4, 32, 4),
    (512, 4, 32, 6),   # 6 leaves 2 rows over: the tail measured faster than 4x64
    (1000, 4, 32, 5),  # one row fewer than the most divides
    (768, 4, 32, 6),
    (197, 4, 32, 6),   # nothing divides a prime: the tail stays
    (1024, 2, 16, 6),  # AVX2: 4x16 has 8 accumulators, too few; the tail stays
])
def test_rows_divide_m_when_the_tail_is_large_and_enough_accumulators_remain(rows, vectors, registers, expected):
    assert tile_rows(rows, vectors, registers) == expected


@pytest.mark.parametrize("name", TARGETS)
def test_vector_unit_is_read_from_the_target_features(name):
    spec, (bits, registers), _ = TARGETS[name]
    target = Target(spec)
    unit = vector_unit(target)
    assert (unit.width_bits, unit.registers) == (bits, registers)
    assert vector_lanes(target) == bits // 32
    tile = register_tile(target)
    assert tile.lanes == bits // 32 and tile.registers == registers and tile.fits


def _dense(m: int, k: int, n: int):
    a = te.placeholder((m, k), name="a")
    b = te.placeholder((k, n), name="b")
    bias = te.placeholder((n,), name="bias")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r] * b[r, j], axis=r), name="matmul")
    out = te.compute((m, n), lambda i, j: c[i, j] + bias[j], name="add")
    return te.create_prim_func([a, b, bias, out])


@pytest.mark.parametrize("name", TARGETS)
def test_matmul_schedule_compiles_for_each_target(name):
    spec, _, runnable_with = TARGETS[name]
    target = Target(spec)
    m, k, n = 30, 64, 128  # M = 30: a predicated last row tile for mr = 6 on every target
    scheduled, rule = schedule_func(_dense(m, k, n), target)
    assert rule == "matmul"
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target)
    if runnable_with is None or not runnable_with <= cpu_flags() or not cpu_flags() & {"avx2"}:
        return  # cross-compiled: compiling is the check
    rng = np.random.default_rng(0)
    a, b, bias = (rng.standard_normal(s).astype("float32") for s in ((m, k), (k, n), (n,)))
    out = tvm.runtime.tensor(np.zeros((m, n), "float32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), tvm.runtime.tensor(bias), out)
    np.testing.assert_allclose(out.numpy(), a @ b + bias, rtol=1e-4, atol=1e-4)


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 192)

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("name", ["haswell", "znver4", "aarch64-neon"])
def test_constant_weights_are_packed_in_panels_of_the_tile_width(name):
    target = Target(TARGETS[name][0])
    graph = export_module(_Linear().eval(), (torch.randn(1, 8, 64),), name="linear")
    mod = lowering.legalize_and_fuse(lowering.import_graph(graph), target, pad_multiple=vector_lanes(target))
    nr = register_tile(target).nr
    scripts = "".join(func.script() for func in mod.functions.values() if isinstance(func, tvm.tirx.PrimFunc))
    # N = 192 padded to whole panels: [N / nr, K, nr]
    padded = -(-192 // nr) * nr
    assert f"T.Buffer((T.int64({padded // nr}), T.int64(64), T.int64({nr}))" in scripts
