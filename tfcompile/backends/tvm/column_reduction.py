"""A reduction over middle axes that keeps the innermost one: ``y[b, k] = sum over h, q of x[b, h, q, k]``.

Token merging and pruning score each key by the attention it receives, a sum of the [B, H, Q, K]
probabilities over heads and queries. ``rules.RowReduction`` took such a kernel as B x K rows, each
reducing over (h, q): every step read a float K floats from the one before, a cache line per element,
one scalar add waiting on the last, and the rows ran in parallel over B. On the EPYC of session 22 the
first such sum of minilm's 12 x 512 x 512 probabilities took 8.5 ms alone, 95 µs under this rule
(``benchmarks/tvm_row_kernels.py --before column --kernels``).

This rule puts the kept axis innermost, under the reduction loops: each step adds a contiguous run of
probabilities into a run of sums, a loop LLVM vectorises. The sums are split in chunks of whole vectors
among the threads where B alone gives too few parallel iterations. Every sum still adds its terms in the original order
(h, then q), one term a step, as the serial loop did.
"""

from __future__ import annotations

import math

from tvm import tirx

from tfcompile.backends.tvm.schedule_base import Rule, inline_spatial, lanes_of, largest_divisor, loop_extent, \
    schedule_of, vector_widths

# Parallel iterations wanted over the kept outer axes and the kept inner axis's chunks.
PARALLEL_ITERATIONS = 4
# Sums to a chunk at least: below this, a chunk's loop overhead outweighs the parallelism.
MIN_CHUNK = 32


def _kept_inner(block) -> int | None:
    """The index of the spatial iterator that indexes the innermost axis of every buffer ``block`` reads,
    when there is one and the block reduces over at least one iterator."""
    iter_vars = list(block.iter_vars)
    if all(iv.iter_type == tirx.IterVar.DataPar for iv in iter_vars) or not block.reads:
        return None
    found = None
    for region in block.reads:
        last = region.region[-1]
        if not (isinstance(last.extent, tirx.IntImm) and int(last.extent) == 1):
            return None
        index = next((i for i, iv in enumerate(iter_vars) if iv.var.same_as(last.min)), None)
        if index is None or iter_vars[index].iter_type != tirx.IterVar.DataPar or found not in (None, index):
            return None
        found = index
    return found


class ColumnReduction(Rule):
    """A lone reduction block whose reads' innermost axis is one of its spatial iterators."""

    name = "column-reduction"

    def apply(self, func, target):
        sch, infos = schedule_of(func)
        if not infos:
            return None
        reductions = [info.block_rv for info in infos if not info.is_injective()]
        if len(reductions) != 1:
            return None
        block = reductions[0]
        inline_spatial(sch, keep=[block])
        if len(sch.get_child_blocks(sch.get_sblock("root"))) != 1:
            return None
        stmt = sch.get(block)
        kept = _kept_inner(stmt)
        loops = sch.get_loops(block)
        if kept is None or len(loops) != len(stmt.iter_vars):
            return None
        extents = [loop_extent(sch, loop) for loop in loops]
        if any(e is None or e != int(iv.dom.extent) for e, iv in zip(extents, stmt.iter_vars)):
            return None  # loops not one per iterator, in order: not the nest this rule reorders
        spatial = [i for i, iv in enumerate(stmt.iter_vars) if iv.iter_type == tirx.IterVar.DataPar]
        outer = [loops[i] for i in spatial if i != kept]
        reduced = [loops[i] for i in range(len(loops)) if i not in spatial]
        outer_iterations = math.prod(extents[i] for i in spatial if i != kept)
        width = largest_divisor(extents[kept], vector_widths(lanes_of(sch, block, target)))
        chunks = self._chunks(extents[kept], outer_iterations, width)
        chunk_loop, inner = sch.split(loops[kept], factors=[chunks, None])
        sch.reorder(*outer, chunk_loop, *reduced, inner)
        parallel = outer + [chunk_loop]
        fused = sch.fuse(*parallel) if len(parallel) > 1 else parallel[0]
        if outer_iterations * chunks > 1:
            sch.parallel(fused)
        # The init hoisted out of the reduction loops leaves the inner loop a plain contiguous add, which
        # LLVM vectorises; TVM refuses to vectorise it once the init is decomposed.
        sch.decompose_reduction(block, reduced[0])
        return sch

    @staticmethod
    def _chunks(kept: int, outer_iterations: int, width: int) -> int:
        """How many parallel chunks to cut the kept axis into: a divisor of its extent in whole vectors, no
        smaller than MIN_CHUNK, and only as many as PARALLEL_ITERATIONS needs."""
        if outer_iterations >= PARALLEL_ITERATIONS:
            return 1
        unit = max(width, 1)
        for chunks in range(PARALLEL_ITERATIONS // outer_iterations, 1, -1):
            if kept % (chunks * unit) == 0 and kept // chunks >= MIN_CHUNK:
                return chunks
        return 1
