"""Zero-TPrune's token ranking, emitted into the graph (used by ``token_pruning``).

For one attention layer: the attention is rewritten as an explicit
softmax(QKᵀ·scale + mask)·V so its probabilities P exist as a value
(``explicit_attention``); ``keep_indices`` then emits Weighted PageRank on P
per head, the variance head filter, the RMS head combination and the S-stage
(drop the less important tokens whose keys are most similar to an important
token's), and returns the [B, K] indices of the tokens to keep, CLS first,
padding last. Everything is ATen ops on static shapes, so it lowers to ONNX
Runtime and TVM like the rest of the graph. Not a pass by itself: it changes
nothing until ``token_pruning`` gathers the states with these indices.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx

from tfcompile.graph import ModelGraph
from tfcompile.passes import token_merging
from tfcompile import structure

aten = torch.ops.aten

DEFAULT_HEAD_RANGE = (0.01, 0.7)


def default_iterations(layer: int, layers: int) -> int:
    # The paper iterates 30–50 times in the first quarter of a 12-layer ViT, 5–10 in the
    # middle, once at the end. Each iteration re-reads P (B·H·N² floats), which is not
    # cheap on a CPU, and the ranking settles long before the scores do, so fewer here.
    if layer < layers / 4:
        return 8
    if layer < 3 * layers / 4:
        return 3
    return 1


class Emitter:
    """Appends ATen calls (and constants) at the graph's current insertion point."""

    def __init__(self, graph: ModelGraph):
        self.gm = graph.gm
        self.g = graph.gm.graph

    def __call__(self, target, *args, **kwargs) -> torch.fx.Node:
        return self.g.call_function(target, args, kwargs)

    def const(self, name: str, value: torch.Tensor) -> torch.fx.Node:
        return self.g.get_attr(structure.add_constant(self.gm, name, value))


def explicit_attention(e: Emitter, site: structure.AttentionSite) -> tuple[torch.fx.Node, torch.fx.Node]:
    """softmax(QKᵀ·scale + mask)·V with the probabilities as a value; returns (output, P)."""
    q, k, v = site.node.args[:3]
    d = structure.tensor_meta(q).shape[-1]
    scale = site.node.kwargs.get("scale") or (site.node.args[6] if len(site.node.args) > 6 else None)
    scores = e(aten.matmul.default, q, e(aten.transpose.int, k, -2, -1))
    scores = e(aten.mul.Tensor, scores, float(scale) if scale is not None else 1.0 / math.sqrt(d))
    if site.mask is not None:
        if structure.tensor_meta(site.mask).dtype == torch.bool:
            # A large finite fill, not −inf: a fully masked row must not turn into NaN.
            scores = e(aten.masked_fill.Scalar, scores, e(aten.logical_not.default, site.mask),
                       torch.finfo(torch.float32).min)
        else:
            scores = e(aten.add.Tensor, scores, site.mask)
    probs = e(aten.softmax.int, scores, -1)
    return e(aten.matmul.default, probs, v), probs


def keep_indices(e: Emitter, probs: torch.fx.Node, keys: torch.fx.Node, shape, keep: int, *, iterations: int,
                  head_range: tuple[float, float], sim_fraction: float, cls_weight: str,
                  parts: dict | None = None) -> torch.fx.Node:
    """The [B, keep] indices of the tokens to keep, from P [B, H, N, N] and the keys [B, H, N, d].
    ``parts`` (when given) receives the values merging reuses: "valid" [B, N] and "unit" keys."""
    batch, heads, n, d = shape
    first = e.const("prune_first_token", torch.nn.functional.one_hot(torch.tensor(0), n).float())
    # A key no query attends to is padding: its column of P is exactly 0 (exp of the fill underflows).
    valid = e(aten.gt.Scalar, e(aten.sum.dim_IntList, probs, [1, 2]), 0.0)
    validf = e(aten._to_copy.default, valid, dtype=torch.float32)
    count = e(aten.sum.dim_IntList, validf, [1], True)  # [B, 1]
    parts = {} if parts is None else parts
    parts["valid"] = validf
    start = validf
    if cls_weight == "sqrt":
        boost = e(aten.mul.Tensor, e(aten.sub.Tensor, e(aten.sqrt.default, count), 1.0), first)
        start = e(aten.mul.Tensor, validf, e(aten.add.Tensor, boost, 1.0))
    start = e(aten.div.Tensor, start, e(aten.sum.dim_IntList, start, [1], True))
    s = e(aten.unsqueeze.default, e(aten.unsqueeze.default, start, 1), 1)  # [B, 1, 1, N]
    s = e(aten.expand.default, s, [batch, heads, 1, n])
    pre = None
    for _ in range(max(1, iterations)):
        s = e(aten.matmul.default, s, probs)  # token i gathers Σ_j P[j, i]·s_j; Σ s stays 1
        pre = pre or s
    # Head filter on N-scaled scores (mean 1 over valid tokens), so the paper's [0.01, 0.7]
    # range means the same at any sequence length.
    scaled = e(aten.mul.Tensor, s, e(aten.unsqueeze.default, e(aten.unsqueeze.default, count, 1), 1))
    dev = e(aten.mul.Tensor, e(aten.sub.Tensor, scaled, 1.0), e(aten.view.default, validf, [batch, 1, 1, n]))
    var = e(aten.div.Tensor, e(aten.sum.dim_IntList, e(aten.mul.Tensor, dev, dev), [-1], True),
            e(aten.view.default, count, [batch, 1, 1, 1]))
    lo, hi = head_range
    kept = e(aten.logical_and.default, e(aten.ge.Scalar, var, lo), e(aten.le.Scalar, var, hi))
    weight = e(aten._to_copy.default, kept, dtype=torch.float32)  # [B, H, 1, 1]
    nkept = e(aten.sum.dim_IntList, weight, [1], True)
    weight = e(aten.add.Tensor, weight, e(aten._to_copy.default, e(aten.eq.Scalar, nkept, 0.0), dtype=torch.float32))
    weight = e(aten.div.Tensor, weight, e(aten.sum.dim_IntList, weight, [1], True))
    # EIR: root mean square over the kept heads.
    importance = e(aten.sqrt.default, e(aten.sum.dim_IntList, e(aten.mul.Tensor, e(aten.mul.Tensor, s, s), weight),
                                        [1]))
    importance = e(aten.view.default, importance, [batch, n])
    score = importance
    drop_by_similarity = int(sim_fraction * (n - keep))
    if drop_by_similarity > 0:
        # S-stage: A = valid tokens below the mean one-iteration score (the paper's lower
        # half, without a data-dependent sort), B = the rest, CLS always in B.
        pre_rms = e(aten.view.default, e(aten.sqrt.default, e(aten.mean.dim, e(aten.mul.Tensor, pre, pre), [1])),
                    [batch, n])
        mean = e(aten.div.Tensor, e(aten.sum.dim_IntList, e(aten.mul.Tensor, pre_rms, validf), [1], True), count)
        in_b = e(aten.logical_or.default, e(aten.logical_and.default, e(aten.ge.Tensor, pre_rms, mean), valid),
                 e(aten.gt.Scalar, first, 0.5))
        cand_a = e(aten.logical_and.default, valid, e(aten.logical_not.default, in_b))
        unit = parts["unit"] = token_merging.unit_keys(e, keys, shape)
        sim = e(aten.matmul.default, unit, e(aten.transpose.int, unit, 1, 2))  # [B, N, N] key cosine
        parts["similarity"] = sim
        sim = e(aten.masked_fill.Scalar, sim, e(aten.logical_not.default, e(aten.unsqueeze.default, in_b, 1)), -2.0)
        best = e(operator.getitem, e(aten.max.dim, sim, -1), 0)  # max.dim, not amax: TVM imports it
        best = e(aten.masked_fill.Scalar, best, e(aten.logical_not.default, cand_a), -3.0)
        top = e(operator.getitem, e(aten.topk.default, best, drop_by_similarity, -1), 0)
        threshold = e(aten.slice.Tensor, top, 1, drop_by_similarity - 1, drop_by_similarity)
        similar = e(aten.logical_and.default, e(aten.ge.Tensor, best, threshold), cand_a)
        score = e(aten.sub.Tensor, score, e(aten.mul.Tensor, e(aten._to_copy.default, similar, dtype=torch.float32),
                                             10.0))
    # Importance is at most 1: padding goes first, then the similar A tokens; CLS stays.
    score = e(aten.sub.Tensor, score, e(aten.mul.Tensor, e(aten.rsub.Scalar, validf, 1.0), 100.0))
    score = e(aten.add.Tensor, score, e(aten.mul.Tensor, first, 1000.0))
    return e(operator.getitem, e(aten.topk.default, score, keep, -1), 1)
