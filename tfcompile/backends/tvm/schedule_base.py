"""What every CPU schedule rule shares: the ``Rule`` interface and the loop and block helpers.

``rules`` holds the rules themselves; this module is what they, and rules kept in modules of their own
(``column_reduction``), build on.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func

from tfcompile.backends.tvm.target import vector_lanes


def loop_extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def dtype_bits(sch: s_tir.Schedule, block) -> int:
    writes = sch.get(block).writes
    return writes[0].source.dtype.bits if writes else 32


def largest_divisor(n: int, candidates) -> int:
    return next((c for c in candidates if n % c == 0), 1)


def vector_widths(lanes: int) -> list[int]:
    """The vector widths an elementwise loop is split by, widest first: up to four registers' worth."""
    return [lanes * 4, lanes * 2, lanes, lanes // 2, lanes // 4]


def lanes_of(sch: s_tir.Schedule, block, target) -> int:
    return vector_lanes(target, dtype_bits(sch, block))


def inline_spatial(sch: s_tir.Schedule, keep) -> None:
    """Inline every spatial block into its consumers (or producer) except the ``keep`` blocks."""
    changed = True
    while changed:
        changed = False
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if any(sch.get(block).same_as(sch.get(k)) for k in keep):
                continue
            if any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(block).iter_vars):
                continue
            for primitive in (sch.compute_inline, sch.reverse_compute_inline):
                try:
                    primitive(block)
                except RuntimeError:  # ScheduleError and TVM's internal errors
                    continue
                changed = True
                break
            if changed:
                break


class Rule:
    name = "rule"

    def apply(self, func: tirx.PrimFunc, target) -> s_tir.Schedule | None:
        raise NotImplementedError


def schedule_of(func: tirx.PrimFunc):
    """A fresh schedule of ``func`` and its normalised blocks (None when TVM cannot normalise them)."""
    sch = s_tir.Schedule(func)
    return sch, normalize_prim_func(sch)


def leading_spatial(sch: s_tir.Schedule, block) -> int:
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    count = 0
    for kind in kinds:
        if kind != tirx.IterVar.DataPar:
            break
        count += 1
    return min(count, len(sch.get_loops(block)))
