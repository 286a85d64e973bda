"""tfcompile's CPU schedule rules for the fused kernels transformer models produce.

TVM 0.27's Relax CPU pipeline leaves every fused PrimFunc as naive serial
loops, and dlight only has CPU rules for GEMV and simple reductions, so this
module schedules the kernel classes the zoo models lower to:

- ``Matmul``: dense and batched matmul (``C[b.., i, j] += A[b.., i, k] * B[b.., k, j]``)
  with injective prologues and epilogues (bias, GELU, residual). Register
  blocking: an ``mr x nr`` tile of C (``target.register_tile``: sized to the register file) lives in a
  local buffer that LLVM keeps in registers across the whole K loop; the B
  panel is reused from cache across the rows of A; outer tiles run in parallel.
- ``RowReduction``: softmax, layer norm, RMS norm and the like: blocks that
  share leading spatial axes (rows) are computed row by row, rows in parallel,
  inner loops vectorised, a row's max or sum factored into a vector of partial
  results.
- ``ColumnReduction`` (``column_reduction``): a sum or max over middle axes that keeps the innermost
  one (attention received per key): the kept axis innermost, under the reduction loops.
- ``Injective``: elementwise / reshape / gather kernels: inlined into one loop
  nest, flattened, vectorised and parallelised (a row no vector width divides
  keeps its own loop, so no vector spans two rows).

``ApplyRules`` is a Relax module pass run between fusion and codegen; a kernel
no rule matches gets only the outer loop parallelised and is reported as
untuned. A rule that raises counts as not matching: a wrong guess about a
kernel's shape must cost speed, never the compile.
"""

from __future__ import annotations

import dataclasses
import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func

from tfcompile.backends.tvm.column_reduction import ColumnReduction
from tfcompile.backends.tvm.schedule_base import (
    Rule,
    dtype_bits,
    inline_spatial,
    lanes_of,
    largest_divisor,
    leading_spatial,
    loop_extent,
    schedule_of,
    vector_widths,
)
from tfcompile.backends.tvm.target import register_tile, tile_rows

# Below this many output elements a parallel launch costs more than it saves.
PARALLEL_MIN_ELEMENTS = 8192
# Rows at least this long that no vector width divides keep a loop of their own (``_flat_parallel_vectorize``).
ROW_LOOP_MIN = 32


@dataclasses.dataclass
class ScheduleReport:
    applied: dict[str, str] = dataclasses.field(default_factory=dict)  # kernel -> rule name
    untuned: list[str] = dataclasses.field(default_factory=list)


def _vectorize_inner(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Vectorise the innermost loop of ``block`` by a divisor of its extent, if one is >= 4."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    extent = loop_extent(sch, inner)
    if extent is None:
        return
    width = largest_divisor(extent, vector_widths(lanes))
    if width < 4:
        return
    if width < extent:
        inner = sch.split(inner, factors=[None, width])[1]
    sch.vectorize(inner)


def _flat_parallel_vectorize(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Flatten a spatial loop nest, vectorise its tail and parallelise its head.

    A vector never spans two rows of the innermost axis when that axis is long: its width divides the row,
    so all its lanes share the outer indices and its loads are one run (strided at worst). A width that
    only divides the whole nest (197-token rows: 4) makes every lane its own floordiv/floormod of the flat
    index, and TVM emits a gather per vector; such rows (ROW_LOOP_MIN or more elements) keep their own
    loop, left to LLVM's vectoriser, under a parallel loop over the rows. On the EPYC of session 21 that ran
    vit-base's score-mask add 4.6x and minilm's local-attention tile copies 3-24x faster
    (``benchmarks/tvm_row_kernels.py --kernels``)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    widths = vector_widths(lanes)
    row = loop_extent(sch, loops[-1])
    if row is not None and row >= ROW_LOOP_MIN and len(loops) > 1 and largest_divisor(row, widths) < 4:
        rows = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        rows_extent = loop_extent(sch, rows)
        if rows_extent is None or rows_extent * row >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(rows)
        return
    _fuse_and_vectorize(sch, loops, lanes, largest_divisor(row, widths) if row and row >= ROW_LOOP_MIN else 1)


def _fuse_and_vectorize(sch: s_tir.Schedule, loops, lanes: int, width: int = 1) -> None:
    """Fuse ``loops`` into one, split a vector of ``width`` off it (below 4: of the widest width that divides
    the whole nest), vectorise that and parallelise the rest."""
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    total = loop_extent(sch, fused)
    if total is None:
        sch.parallel(fused)
        return
    width = width if width >= 4 else largest_divisor(total, vector_widths(lanes))
    if width >= 4 and width < total:
        outer, inner = sch.split(fused, factors=[None, width])
        sch.vectorize(inner)
    elif width >= 4:
        sch.vectorize(fused)
        return
    else:
        outer = fused
    if total >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(outer)


class Injective(Rule):
    """Every block spatial: one flattened, vectorised, parallel loop per remaining block."""

    name = "injective"

    def apply(self, func, target):
        sch, infos = schedule_of(func)
        if not infos or not all(info.is_injective() for info in infos):
            return None
        last = infos[-1].block_rv
        inline_spatial(sch, keep=[last])
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            _flat_parallel_vectorize(sch, block, lanes_of(sch, block, target))
        return sch


class RowReduction(Rule):
    """Reductions over the inner axes of rows (softmax, layer norm, RMS norm, max/sum)."""

    name = "row-reduction"

    def apply(self, func, target):
        sch, infos = schedule_of(func)
        if not infos or all(info.is_injective() for info in infos):
            return None
        kinds = [info.dom_kind() for info in infos]
        # Each reduction reduces trailing axes only: "S..SR..R".
        for kind in kinds:
            if "R" in kind and ("S" in kind[kind.index("R"):] or not kind.startswith("S")):
                return None
            if any(c not in "SR" for c in kind):
                return None
        last = infos[-1].block_rv
        inline_spatial(sch, keep=[info.block_rv for info in infos if not info.is_injective()] + [last])
        reductions = [info.block_rv for info in infos if not info.is_injective()]
        rows = min(leading_spatial(sch, b) for b in sch.get_child_blocks(sch.get_sblock("root")))
        if rows == 0:
            return None
        partials = [p for p in (_factor_reduction(sch, b, lanes_of(sch, b, target), rows) for b in reductions) if p]
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        last = blocks[-1]
        loops = sch.get_loops(last)
        row_loop = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
        for block in reversed(blocks[:-1]):
            sch.compute_at(block, row_loop, preserve_unit_loops=True)
        row_count = loop_extent(sch, row_loop)
        if row_count is None or row_count > 1:
            sch.parallel(row_loop)
        for block in sch.get_child_blocks(row_loop):
            # The row loop is the outermost loop of every block.
            if len(sch.get_loops(block)) == 1:
                continue  # one element per row: nothing inside the row loop to vectorise
            stmt = sch.get(block)
            lanes = lanes_of(sch, block, target)
            if all(iv.iter_type == tirx.IterVar.DataPar for iv in stmt.iter_vars):
                _vectorize_inner(sch, block, lanes)
            elif any(sch.get(block).same_as(sch.get(p)) for p in partials):
                _vectorize_partials(sch, block, lanes)
            else:
                _unroll_inner(sch, block, lanes)
        return sch


def _domain_size(sch: s_tir.Schedule, block) -> int | None:
    extents = [iv.dom.extent for iv in sch.get(block).iter_vars]
    if not all(isinstance(e, tirx.IntImm) for e in extents):
        return None
    return math.prod(int(e) for e in extents)


def _factor_reduction(sch: s_tir.Schedule, block, lanes: int, rows: int):
    """Reduce each row ``lanes`` elements at a time into ``lanes`` partial results (TVM's rfactor; the new
    block is returned, to be vectorised), which ``block`` then reduces into one: a vector max or sum per
    step instead of a scalar chain whose every step waits on the one before. LLVM vectorises the chain
    itself when the target lets it reassociate (``target.host_target``), but less well: minilm's softmax
    over 512 keys ran 1.95x faster factored (``benchmarks/tvm_row_kernels.py --before reduction
    --kernels``). None unless ``block`` reduces one axis after its ``rows`` row axes whose extent is a
    whole number of vectors, and TVM can factor it (where it cannot, the row's loop stays split in two,
    which changes nothing of what it computes)."""
    loops = sch.get_loops(block)
    if len(loops) != rows + 1:
        return None
    extent = loop_extent(sch, loops[-1])
    if extent is None or extent % lanes or extent == lanes:
        return None
    try:
        _, inner = sch.split(loops[-1], factors=[None, lanes])
        return sch.rfactor(inner, factor_axis=0)
    except RuntimeError:  # ScheduleError and TVM's internal errors
        return None


def _vectorize_partials(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Vectorise a factored reduction's partial results: ``compute_at`` lays its loops out in the order of
    its block's iterators, the factor axis (``rfactor``'s ``factor_axis=0``) first and the reduction last,
    so those two swap and the factor axis, innermost, is vectorised."""
    inner = [loop for loop in sch.get_loops(block)[1:] if loop_extent(sch, loop) != 1]
    if len(inner) != 2 or loop_extent(sch, inner[0]) != lanes:
        return
    sch.reorder(inner[1], inner[0])
    sch.vectorize(inner[0])


def _unroll_inner(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Let LLVM unroll (and so pipeline) a scalar reduction's inner loop."""
    loops = sch.get_loops(block)
    if not loops:
        return
    sch.annotate(loops[-1], "pragma_auto_unroll_max_step", lanes)
    sch.annotate(loops[-1], "pragma_unroll_explicit", 1)


@dataclasses.dataclass(frozen=True)
class MatmulAxes:
    batch: list
    i: object  # None for a GEMV
    j: object
    k: object
    # B stored panel-major (``B[j // w, k, j % w]``, see matmul_layout.py): the panel width w, else None.
    panel_width: int | None = None


def _mentions(expr, var) -> bool:
    from tvm.tirx.analysis import undefined_vars

    return any(v.same_as(var) for v in undefined_vars(expr))


def _panel_width(index, j_var) -> int | None:
    """w if ``index`` is ``j % w`` (a panel-major B's innermost index)."""
    if isinstance(index, tirx.FloorMod) and index.a.same_as(j_var) and isinstance(index.b, tirx.IntImm):
        return int(index.b)
    return None


def _matmul_iters(sch: s_tir.Schedule, info):
    """The loops of a matmul block, or None if it is not one."""
    kind = info.dom_kind()
    if not (kind.endswith("R") and kind.count("R") == 1 and set(kind[:-1]) == {"S"}):
        return None
    stmt = sch.get(info.block_rv)
    if len(stmt.reads) < 2 or len(stmt.writes) != 1:
        return None
    ivars = [iv.var for iv in stmt.iter_vars]
    k_var, j_var = ivars[-1], ivars[-2]
    # A GEMV (one row of A; the unit row axis is normalised away) has no i axis.
    i_var = ivars[-3] if len(ivars) >= 3 else None

    def uses(region, var) -> bool:
        return any(r.min.same_as(var) for r in region.region)

    def mentions(region, var) -> bool:
        return any(_mentions(r.min, var) for r in region.region)

    def dims(region) -> list:
        return [r.min for r in region.region]

    operands = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
    a = next((r for r in operands if uses(r, k_var) and not mentions(r, j_var)), None)
    b = next((r for r in operands if mentions(r, j_var) and uses(r, k_var)), None)
    if a is None or b is None:
        return None
    if i_var is not None and (not uses(a, i_var) or mentions(b, i_var)):
        i_var = None  # the third-last axis is a batch axis: a batched GEMV
    out = dims(stmt.writes[0])
    # Vectorising over j needs j contiguous in B and C.
    panel_width = _panel_width(dims(b)[-1], j_var)
    if not (out[-1].same_as(j_var) and (dims(b)[-1].same_as(j_var) or panel_width)):
        return None
    loops = [it.loop_rv for it in info.iters]
    if i_var is None:
        return MatmulAxes(loops[:-2], None, loops[-2], loops[-1], panel_width)
    return MatmulAxes(loops[:-3], loops[-3], loops[-2], loops[-1], panel_width)


class Matmul(Rule):
    """Register-blocked matmul with the epilogue computed from the register tile."""

    name = "matmul"

    def apply(self, func, target):
        sch, infos = schedule_of(func)
        if not infos:
            return None
        reductions = [info for info in infos if not info.is_injective()]
        if len(reductions) != 1:
            return None
        main = reductions[0]
        if _matmul_iters(sch, main) is None:
            return None
        block = main.block_rv
        name = sch.get(block).name_hint
        inline_spatial(sch, keep=[block] + [info.block_rv for info in infos if info is not main][-1:])
        block = sch.get_sblock(name)
        roots = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
        prologues, epilogues = roots[:roots.index(name)], roots[roots.index(name) + 1:]
        info = next(i for i in normalize_prim_func(sch) if sch.get(i.block_rv).name_hint == name)
        axes = _matmul_iters(sch, info)
        batch, i, j, k = axes.batch, axes.i, axes.j, axes.k
        if i is None:
            # Give a GEMV a unit row axis so it takes the same path as a matmul.
            i = sch.add_unit_loop(j)
        extents = [loop_extent(sch, loop) for loop in (*batch, i, j, k)]
        if any(e is None for e in extents):
            return None
        tile = register_tile(target, dtype_bits(sch, block))
        lanes = tile.lanes
        m, n = extents[-3], extents[-2]
        nr = axes.panel_width or largest_divisor(n, [tile.nr, 2 * lanes, lanes, lanes // 2, lanes // 4])
        if nr < 4 or n % nr:
            return None  # no SIMD width divides N: leave it to the fallback (see pad_matmul_n)
        mr = tile_rows(m, max(nr // lanes, 1), tile.registers)
        i0, i1 = sch.split(i, factors=[None, mr])
        j0, j1 = sch.split(j, factors=[None, nr])
        sch.reorder(*batch, j0, i0, k, i1, j1)
        write = sch.cache_write(block, 0, "local")
        write_name = sch.get(write).name_hint
        # The epilogue reads C once per element: fold it into the write-back of the register tile.
        c_elements = math.prod(extents[:-1])
        while epilogues and _domain_size(sch, sch.get_sblock(epilogues[0])) == c_elements:
            # (A consumer reading only part of C, e.g. a slice off padded columns, would be
            # inlined with C's bounds and write out of its own buffer.)
            try:
                sch.reverse_compute_inline(sch.get_sblock(epilogues[0]))
            except RuntimeError:  # ScheduleError and TVM's internal errors
                break
            epilogues.pop(0)
        write = sch.get_sblock(write_name)
        sch.reverse_compute_at(write, i0, preserve_unit_loops=True)
        sch.unroll(i1)
        sch.vectorize(j1)
        loops = sch.get_loops(write)
        sch.unroll(loops[-2])
        sch.vectorize(loops[-1])
        # (Packing the K x nr panel of B per column tile, to spare the strided B reads, measured
        # slower: 11.5 against 7.0 ms median on 128x768x3072 + GELU, the copy costing more than it saves.)
        outer = sch.fuse(*batch, j0, i0) if batch else sch.fuse(j0, i0)
        if math.prod(extents[:-1]) >= PARALLEL_MIN_ELEMENTS // 4:
            sch.parallel(outer)
        # Last: primitives above refuse a reduction block that has lost its init.
        init = sch.decompose_reduction(block, k)
        loops = sch.get_loops(init)
        sch.unroll(loops[-2])
        sch.vectorize(loops[-1])
        for other in prologues + epilogues:
            other_block = sch.get_sblock(other)
            _flat_parallel_vectorize(sch, other_block, lanes_of(sch, other_block, target))
        return sch


class Fallback(Rule):
    """Parallelise the outermost spatial loop of each block; the kernel still counts as untuned."""

    name = "fallback"

    def apply(self, func, target):
        sch = s_tir.Schedule(func)
        if normalize_prim_func(sch) is None:
            return None
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            loops = sch.get_loops(block)
            if loops and leading_spatial(sch, block) > 0 and (loop_extent(sch, loops[0]) or 2) > 1:
                sch.parallel(loops[0])
        return sch


DEFAULT_RULES: tuple[Rule, ...] = (Matmul(), ColumnReduction(), RowReduction(), Injective())


def rule_schedule(func: tirx.PrimFunc, target, rules=DEFAULT_RULES) -> tuple[s_tir.Schedule, str] | None:
    """The schedule of the first rule that matches ``func`` (with its trace), and the rule's name."""
    for rule in rules:
        try:
            sch = rule.apply(func, target)
        except Exception:  # noqa: BLE001  (a rule that fails on a kernel just does not match it)
            sch = None
        if sch is not None:
            return sch, rule.name
    return None


def schedule_func(func: tirx.PrimFunc, target, rules=DEFAULT_RULES) -> tuple[tirx.PrimFunc, str | None]:
    """``func`` scheduled by the first matching rule, and that rule's name (None: fallback or none)."""
    matched = rule_schedule(func, target, rules)
    if matched is not None:
        sch, name = matched
        return sch.mod["main"].with_attr("tirx.is_scheduled", True), name
    try:
        sch = Fallback().apply(func, target)
    except Exception:  # noqa: BLE001
        sch = None
    return (func if sch is None else sch.mod["main"]), None


@tvm.transform.module_pass(opt_level=0, name="TfcompileApplyRules")
class ApplyRules:
    """Schedule every unscheduled PrimFunc of a module with ``rules``; fills ``report``."""

    def __init__(self, target, rules=DEFAULT_RULES):
        self.target = target
        self.rules = tuple(rules)
        self.report = ScheduleReport()

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            scheduled, rule = schedule_func(func, self.target, self.rules)
            if rule is None:
                self.report.untuned.append(gvar.name_hint)
            else:
                self.report.applied[gvar.name_hint] = rule
            updates[gvar] = scheduled
        # Write into a copy: the caller may compile the same fused module several ways.
        mod = mod.clone()
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and "tirx.is_scheduled" in func.attrs and func.attrs["tirx.is_scheduled"])
