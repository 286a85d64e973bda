"""Structured FFNs: factorise the FFN projections (``structure_ffn``) or merge structured factors back
into one dense GEMM (``premerge_ffn``, in ``ffn_premerge.py``).

``structure_ffn`` rewrites every FFN block found by ``structure.ffn_blocks``
(up [and gate] linear → pointwise activation → down linear; GPT-2's Conv1D
``addmm`` included): each projection ``x·Wᵀ + b`` becomes

- ``lowrank``: ``linear(linear(x, V), U, b)`` with ``U·V`` the rank-r
  truncated SVD of W (the best rank-r approximation in Frobenius norm), or
- ``blockdense``: ``linear(blkdiag(V₁..V_k)·x, U, b)`` where the input is split
  into k chunks; column block i of W is approximated by its rank-r/k SVD
  ``U_i·V_i`` (which is optimal for this structure, as the blocks are
  independent), U = [U₁ … U_k]. The block-diagonal GEMM is one batched GEMM
  (``structure.emit_blockdense_linear``, the form the cost model prices too).

Rank: ``rank_ratio`` (r = ratio · min(in, out), e.g. 0.25 → d/4 for d → 4d)
or ``max_weight_error`` (the smallest r whose relative Frobenius error
‖W − Ŵ‖/‖W‖ stays within the budget), rounded up to a multiple of ``align``.
A projection is rewritten only where the context's cost model predicts its
structured form faster at the layer's token count
(``cost_models.ffn.form_latencies_s``), so the choice is per layer and per
token count; ``every_projection=True`` factorises every projection whatever
the prediction (to measure or study the approximation itself). Per-layer
weight errors go to the summary and to the record (``StructureFFNRecord``);
end-to-end quality comes from verification.

Preconditions: an FFN block whose hidden activation is read only by the down
projection, floating-point weights that are model attributes.

Approximate: truncation changes the function (rank_ratio = 1 reproduces W up
to float rounding). A real structured model is trained as one; SVD of a dense
checkpoint is the post-hoc approximation.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from tfcompile import structure
from tfcompile.cost_models.ffn import FORMS, form_latencies_s
from tfcompile.graph import ModelGraph
from tfcompile.passes import ffn_premerge  # noqa: F401  (ffn_premerge registers premerge_ffn)
from tfcompile.passes.base import Exactness, PassRefused, PassResult, Stage, register_pass
from tfcompile.passes.context import PassContext

aten = torch.ops.aten

DEFAULT_RANK_RATIO = 0.25


@dataclasses.dataclass(frozen=True)
class FactorisedProjection:
    layer: str  # module path of the projection
    role: str  # "up" (a gate projection counts as up) or "down"
    in_features: int
    out_features: int
    rank: int
    blocks: int  # 1 for low-rank
    form: str
    tokens: int  # rows of the GEMM in the traced graph
    rel_error: float  # ‖W − Ŵ‖/‖W‖, Frobenius


@dataclasses.dataclass(frozen=True)
class StructureFFNRecord:
    projections: tuple[FactorisedProjection, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class _Factorisation:
    site: structure.GemmSite
    u: torch.Tensor  # [out, r]
    v: torch.Tensor  # [r, in] (low-rank) or [k, in/k, r/k] (block-dense, for bmm)
    projection: FactorisedProjection


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    form: str
    blocks: int
    factorisations: tuple[_Factorisation, ...]
    kept_dense: tuple[str, ...]  # why each other projection was left alone


def _rank_for(singular: list[torch.Tensor], base: int, full: int, total_sq: float, rank_ratio, max_weight_error,
              blocks: int, align: int) -> int:
    """Rank r from the ratio (of ``base`` = min(in, out)) or the error budget.

    r is rounded up to a multiple of ``align`` and of ``blocks`` and capped at
    ``full``, the largest rank the form can have. ``singular`` holds each
    block's singular values (one tensor for low-rank)."""
    step = math.lcm(blocks, max(align, 1))
    if max_weight_error is not None:
        # Smallest per-block rank q whose summed tail energy fits the budget.
        q = 0
        while q < full // blocks:
            tail = sum(float((s[q:] ** 2).sum()) for s in singular)
            if math.sqrt(tail / total_sq) <= max_weight_error:
                break
            q += 1
        r = q * blocks
    else:
        r = round(rank_ratio * base)
    r = max(step, math.ceil(r / step) * step)
    return min(r, full - full % blocks)


def _svds(blocks) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Thin SVD of each block, on one thread.

    MKL's threaded SVD of FFN-sized matrices was 25x slower than the
    single-threaded one on a busy 2-core host (2.1 s vs 0.08 s for 1536x384)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [torch.linalg.svd(b, full_matrices=False) for b in blocks]
    finally:
        torch.set_num_threads(threads)


def _factorise(w: torch.Tensor, rank_ratio, max_weight_error, form: str, blocks: int, align: int):
    """(U [out×r], V, r, relative error) with V [r×in] (lowrank) or [k, in/k, r/k] (blockdense, for bmm)."""
    w64 = w.detach().double()
    out_f, in_f = w64.shape
    k = blocks if form == "blockdense" else 1
    if in_f % k:
        raise ValueError(f"{in_f} input features do not split into {k} blocks")
    parts = _svds(w64.split(in_f // k, dim=1))
    total_sq = float((w64 ** 2).sum()) or 1.0
    full = k * min(out_f, in_f // k)
    r = _rank_for([s for _, s, _ in parts], min(out_f, in_f), full, total_sq, rank_ratio, max_weight_error, k, align)
    q = r // k
    # Split √S between the factors so both have the same scale (better conditioned in fp32).
    us = [u[:, :q] * s[:q].sqrt() for u, s, _ in parts]
    vs = [s[:q].sqrt()[:, None] * vh[:q] for _, s, vh in parts]
    tail = sum(float((s[q:] ** 2).sum()) for _, s, _ in parts)
    u = torch.cat(us, dim=1)
    v = vs[0] if k == 1 else torch.stack([vi.t() for vi in vs])  # blockdense: [k, in/k, q] for bmm
    return u.to(w.dtype), v.to(w.dtype), r, math.sqrt(tail / total_sq)


def _check_knobs(rank_ratio, max_weight_error, form: str) -> tuple[float | None, float | None]:
    if rank_ratio is not None and max_weight_error is not None:
        raise ValueError("give rank_ratio or max_weight_error, not both")
    if rank_ratio is None and max_weight_error is None:
        rank_ratio = DEFAULT_RANK_RATIO
    if rank_ratio is not None and not 0 < rank_ratio <= 1:
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
    if max_weight_error is not None and not 0 <= max_weight_error < 1:
        raise ValueError(f"max_weight_error must be in [0, 1), got {max_weight_error}")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; use lowrank or blockdense")
    return rank_ratio, max_weight_error


def _plan(graph: ModelGraph, context: PassContext, *, rank_ratio: float | None = None,
          max_weight_error: float | None = None, form: str = "lowrank", blocks: int = 4, align: int = 8,
          every_projection: bool = False) -> _Plan:
    rank_ratio, max_weight_error = _check_knobs(rank_ratio, max_weight_error, form)
    ffn_blocks = structure.ffn_blocks(graph)
    if not ffn_blocks:
        raise PassRefused("no FFN block (up/gate linear → activation → down linear with model weights) found")
    if not any(s.weight(graph).is_floating_point() for b in ffn_blocks for s in b.sites):
        raise PassRefused("FFN weights are not floating point (quantised?): nothing to factorise by SVD")
    factorisations, kept = [], []
    for block in ffn_blocks:
        for site in block.sites:
            label = structure.module_path(site.node) or site.node.name
            w = site.weight(graph)
            out_f, in_f = w.shape
            if not w.is_floating_point() or (form == "blockdense" and in_f % blocks):
                kept.append(f"{label} (weight {tuple(w.shape)} {w.dtype})")
                continue
            u, v, r, err = _factorise(w, rank_ratio, max_weight_error, form, blocks, align)
            tokens = site.tokens
            if not every_projection:
                dense_s, structured_s = form_latencies_s(in_f, out_f, r, tokens, context.cost_model, form=form,
                                                         blocks=blocks, bias=site.bias_target is not None,
                                                         dtype=w.dtype)
                if structured_s >= dense_s:
                    kept.append(f"{label} (dense predicted faster at {tokens} tokens: "
                                f"{dense_s * 1e6:.1f} vs {structured_s * 1e6:.1f} us)")
                    continue
            role = "down" if site is block.down else "up"
            projection = FactorisedProjection(label, role, in_f, out_f, r, blocks if form == "blockdense" else 1,
                                              form, tokens, err)
            factorisations.append(_Factorisation(site, u, v, projection))
    if not factorisations:
        raise PassRefused("no projection factorised: " + "; ".join(kept))
    return _Plan(form, blocks, tuple(factorisations), tuple(kept))


def _rewrite_site(graph: ModelGraph, item: _Factorisation, form: str, blocks: int) -> None:
    gm, site = graph.gm, item.site
    node = site.node
    lead = structure.shape_of(site.input)[:-1]
    in_f, out_f, rank = item.projection.in_features, item.projection.out_features, item.projection.rank
    first_new = node.prev
    with gm.graph.inserting_before(node):
        build = structure.GraphBuilder(gm, dtype=item.u.dtype)
        v = build.const(f"{node.name}_{form}_v", item.v)
        u = build.const(f"{node.name}_{form}_u", item.u)
        bias = gm.graph.get_attr(site.bias_target) if site.bias_target is not None else None
        if form == "lowrank":
            out = structure.emit_lowrank_linear(build, site.input, v, u, bias, lead=lead, d_out=out_f, rank=rank)
        else:
            out = structure.emit_blockdense_linear(build, site.input, v, u, bias, lead=lead, d_in=in_f,
                                                   d_out=out_f, rank=rank, blocks=blocks)
    stack = node.meta.get("nn_module_stack", {})
    new = first_new.next
    while new is not node:
        if new.op == "call_function":
            new.meta["nn_module_stack"] = stack
        new = new.next
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


@register_pass("structure_ffn", Exactness.APPROXIMATE,
               "factorise FFN projections into low-rank or block-dense form by truncated SVD",
               plan=_plan, stage=Stage.FFN, runs_after=("premerge_ffn",))
def structure_ffn(graph: ModelGraph, plan: _Plan) -> PassResult:
    attrs = {n.target for n in graph.nodes("get_attr")}
    for item in plan.factorisations:
        _rewrite_site(graph, item, plan.form, plan.blocks)
    structure.remove_dead_code(graph.gm, attrs)  # the dense weights' get_attr nodes
    projections = tuple(item.projection for item in plan.factorisations)
    ranks = sorted({p.rank for p in projections})
    errors = ", ".join(f"{p.layer} {p.rel_error:.3f}" for p in projections)
    summary = (f"factorised {len(projections)} FFN projections ({plan.form}, rank {'/'.join(map(str, ranks))}); "
               f"relative weight error per layer: {errors}")
    if plan.kept_dense:
        summary += f"; kept dense: {'; '.join(plan.kept_dense)}"
    return PassResult(graph, True, summary, StructureFFNRecord(projections))
