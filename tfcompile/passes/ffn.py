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
  independent), U = [U₁ … U_k]. The block-diagonal GEMM is written as
  view → transpose → bmm → transpose → reshape, so ONNX and the cost model
  see one batched GEMM.

Rank: ``rank_ratio`` (r = ratio · min(in, out), e.g. 0.25 → d/4 for d → 4d)
or ``max_weight_error`` (the smallest r whose relative Frobenius error
‖W − Ŵ‖/‖W‖ stays within the budget), rounded up to a multiple of ``align``.
With ``device`` (a target name) only projections whose structured form the
target's cost model predicts faster at the layer's token count are rewritten
(``cost_models.ffn.choose_form``), so the choice is per layer and per token
count. Per-layer weight errors go to the summary and to
``graph.info["structure_ffn"]``; end-to-end quality comes from verification.

Preconditions: an FFN block whose hidden activation is read only by the down
projection, floating-point weights that are model attributes.

Approximate: truncation changes the function (rank_ratio = 1 reproduces W up
to float rounding). A real structured model is trained as one; SVD of a dense
checkpoint is the post-hoc approximation.
"""

from __future__ import annotations

import math

import torch

from tfcompile.cost_models.calibration import load_profile
from tfcompile.cost_models.ffn import choose_form
from tfcompile.graph import ModelGraph
from tfcompile.passes import ffn_premerge  # noqa: F401  (ffn_premerge registers premerge_ffn)
from tfcompile import structure
from tfcompile.passes.base import Exactness, PassResult, Stage, register_checked_pass

aten = torch.ops.aten

DEFAULT_RANK_RATIO = 0.25


def _check(graph: ModelGraph) -> str | None:
    blocks = structure.ffn_blocks(graph)
    if not blocks:
        return "no FFN block (up/gate linear → activation → down linear with model weights) found"
    if not any(s.weight(graph).is_floating_point() for b in blocks for s in b.sites):
        return "FFN weights are not floating point (quantised?): nothing to factorise by SVD"
    return None


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


def _rewrite_site(graph: ModelGraph, site: structure.GemmSite, u, v, form: str, blocks: int) -> None:
    gm = graph.gm
    node = site.node
    stack = node.meta.get("nn_module_stack", {})
    x = site.input
    shape = tuple(int(s) for s in node.args[1 if site.kind == "addmm" else 0].meta["val"].shape)
    in_f, rank = shape[-1], u.shape[1]
    base = node.name
    with gm.graph.inserting_before(node):
        new = []
        if form == "lowrank":
            v_node = gm.graph.get_attr(structure.add_constant(gm, f"{base}_lowrank_v", v))
            h = gm.graph.call_function(aten.linear.default, (x, v_node, None))
            new.append(h)
        else:
            tokens = math.prod(shape[:-1])
            v_node = gm.graph.get_attr(structure.add_constant(gm, f"{base}_blockdense_v", v))
            xb = gm.graph.call_function(aten.view.default, (x, [tokens, blocks, in_f // blocks]))
            xt = gm.graph.call_function(aten.transpose.int, (xb, 0, 1))
            hb = gm.graph.call_function(aten.bmm.default, (xt, v_node))
            ht = gm.graph.call_function(aten.transpose.int, (hb, 0, 1))
            # reshape, not view: the transposed blocks are not contiguous.
            h = gm.graph.call_function(aten.reshape.default, (ht, list(shape[:-1]) + [rank]))
            new += [xb, xt, hb, ht, h]
        u_node = gm.graph.get_attr(structure.add_constant(gm, f"{base}_{form}_u", u))
        b_node = gm.graph.get_attr(site.bias_target) if site.bias_target is not None else None
        out = gm.graph.call_function(aten.linear.default, (h, u_node, b_node))
        new.append(out)
    for n in new:
        n.meta["nn_module_stack"] = stack
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


@register_checked_pass("structure_ffn", Exactness.APPROXIMATE,
               "factorise FFN projections into low-rank or block-dense form by truncated SVD", _check, stage=Stage.FFN, runs_after=('premerge_ffn',))
def structure_ffn(graph: ModelGraph, *, rank_ratio: float | None = None, max_weight_error: float | None = None,
                  form: str = "lowrank", blocks: int = 4, align: int = 8, device: str | None = None,
                  backend: str | None = None) -> PassResult:
    if rank_ratio is not None and max_weight_error is not None:
        raise ValueError("give rank_ratio or max_weight_error, not both")
    if rank_ratio is None and max_weight_error is None:
        rank_ratio = DEFAULT_RANK_RATIO
    if rank_ratio is not None and not 0 < rank_ratio <= 1:
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
    if max_weight_error is not None and not 0 <= max_weight_error < 1:
        raise ValueError(f"max_weight_error must be in [0, 1), got {max_weight_error}")
    if form not in ("lowrank", "blockdense"):
        raise ValueError(f"unknown form {form!r}; use lowrank or blockdense")
    profile = load_profile(device, backend) if device and backend else None
    records, kept = [], []
    attrs = {n.target for n in graph.nodes("get_attr")}
    for block in structure.ffn_blocks(graph):
        for site in block.sites:
            role = "down" if site is block.down else "up"  # a gate projection counts as "up"
            label = structure.module_path(site.node) or site.node.name
            w = site.weight(graph)
            out_f, in_f = w.shape
            if not w.is_floating_point() or (form == "blockdense" and in_f % blocks):
                kept.append(f"{label} (weight {tuple(w.shape)} {w.dtype})")
                continue
            u, v, r, err = _factorise(w, rank_ratio, max_weight_error, form, blocks, align)
            tokens = site.tokens
            if device is not None:
                choice = choose_form(in_f, out_f, r, tokens, device, form=form, blocks=blocks,
                                     bias=site.bias_target is not None, dtype=w.dtype, profile=profile)
                if choice.best == "dense":
                    kept.append(f"{label} (dense predicted faster at {tokens} tokens: "
                                f"{choice.dense_s * 1e6:.1f} vs {choice.structured_s * 1e6:.1f} us)")
                    continue
            _rewrite_site(graph, site, u, v, form, blocks)
            records.append({"layer": label, "role": role,
                            "in": in_f, "out": out_f, "rank": r,
                            "blocks": blocks if form == "blockdense" else 1, "form": form, "tokens": tokens,
                            "rel_error": err})
    graph.info["structure_ffn"] = records
    if not records:
        return PassResult(graph, False, "no projection factorised: " + "; ".join(kept))
    structure.remove_dead_code(graph.gm, attrs)  # the dense weights' get_attr nodes
    ranks = sorted({r["rank"] for r in records})
    errors = ", ".join(f"{r['layer']} {r['rel_error']:.3f}" for r in records)
    summary = (f"factorised {len(records)} FFN projections ({form}, rank {'/'.join(map(str, ranks))}); "
               f"relative weight error per layer: {errors}")
    if kept:
        summary += f"; kept dense: {'; '.join(kept)}"
    return PassResult(graph, True, summary)
