"""Zero-TPrune's token ranking (Wang, Dedhia & Jha, CVPR'24), emitted into the graph.

For one attention layer whose probabilities P [B, H, N, N] exist as a value
(the cut rewrites the attention as an explicit softmax(QKᵀ·scale + mask)·V),
``keep_indices`` emits Weighted PageRank on P per head, the variance head
filter, the RMS head combination and the S-stage (drop the less important
tokens whose keys are most similar to an important token's), and returns the
[B, K] indices of the tokens to keep, CLS first, padding last. Everything is
ATen ops on static shapes, so it lowers to ONNX Runtime and TVM like the rest
of the graph. Not a pass by itself: ``prune_tokens`` gathers the states with
these indices.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from tfcompile import structure
from tfcompile.passes.tokens.merging import unit_keys

aten = torch.ops.aten

DEFAULT_HEAD_RANGE = (0.01, 0.7)
CLS_WEIGHTS = ("sqrt", "uniform")


def default_iterations(layer: int, layers: int) -> int:
    # The paper iterates 30–50 times in the first quarter of a 12-layer ViT, 5–10 in the
    # middle, once at the end. Each iteration re-reads P (B·H·N² floats), which is not
    # cheap on a CPU, and the ranking settles long before the scores do, so fewer here.
    if layer < layers / 4:
        return 8
    if layer < 3 * layers / 4:
        return 3
    return 1


@dataclasses.dataclass(frozen=True)
class WeightedPageRank:
    """How one cut ranks its tokens; emitted beside the explicit attention it reads."""

    iterations: int
    head_range: tuple[float, float]
    sim_fraction: float
    cls_weight: str
    unit_keys: bool  # merging needs the keys as unit vectors even when the S-stage does not run

    at_attention = True  # emitted before the attention, not at the cut

    def emit(self, build: structure.GraphBuilder, keys: torch.fx.Node, probs: torch.fx.Node, shape, keep: int,
             parts: dict) -> torch.fx.Node:
        idx = keep_indices(build, probs, keys, shape, keep, iterations=self.iterations, head_range=self.head_range,
                           sim_fraction=self.sim_fraction, cls_weight=self.cls_weight, parts=parts)
        if self.unit_keys and "unit" not in parts:
            parts["unit"] = unit_keys(build, keys, shape)
        return idx


def keep_indices(build: structure.GraphBuilder, probs: torch.fx.Node, keys: torch.fx.Node, shape, keep: int, *,
                 iterations: int, head_range: tuple[float, float], sim_fraction: float, cls_weight: str,
                 parts: dict | None = None) -> torch.fx.Node:
    """The [B, keep] indices of the tokens to keep, from P [B, H, N, N] and the keys [B, H, N, d].
    ``parts`` (when given) receives the values merging reuses: "valid" [B, N] and "unit" keys."""
    b = build
    batch, heads, n, _ = shape
    first = b.const("prune_first_token", torch.nn.functional.one_hot(torch.tensor(0), n).float())
    # A key no query attends to is padding: its column of P is exactly 0 (exp of the fill underflows).
    valid = b(aten.gt.Scalar, b(aten.sum.dim_IntList, probs, [1, 2]), 0.0)
    validf = b(aten._to_copy.default, valid, dtype=torch.float32)
    count = b(aten.sum.dim_IntList, validf, [1], True)  # [B, 1]
    parts = {} if parts is None else parts
    parts["valid"] = validf
    start = validf
    if cls_weight == "sqrt":
        boost = b(aten.mul.Tensor, b(aten.sub.Tensor, b(aten.sqrt.default, count), 1.0), first)
        start = b(aten.mul.Tensor, validf, b(aten.add.Tensor, boost, 1.0))
    start = b(aten.div.Tensor, start, b(aten.sum.dim_IntList, start, [1], True))
    s = b(aten.unsqueeze.default, b(aten.unsqueeze.default, start, 1), 1)  # [B, 1, 1, N]
    s = b(aten.expand.default, s, [batch, heads, 1, n])
    pre = None
    for _ in range(max(1, iterations)):
        s = b(aten.matmul.default, s, probs)  # token i gathers Σ_j P[j, i]·s_j; Σ s stays 1
        pre = pre or s
    # Head filter on N-scaled scores (mean 1 over valid tokens), so the paper's [0.01, 0.7]
    # range means the same at any sequence length.
    scaled = b(aten.mul.Tensor, s, b(aten.unsqueeze.default, b(aten.unsqueeze.default, count, 1), 1))
    dev = b(aten.mul.Tensor, b(aten.sub.Tensor, scaled, 1.0), b(aten.view.default, validf, [batch, 1, 1, n]))
    var = b(aten.div.Tensor, b(aten.sum.dim_IntList, b(aten.mul.Tensor, dev, dev), [-1], True),
            b(aten.view.default, count, [batch, 1, 1, 1]))
    lo, hi = head_range
    kept = b(aten.logical_and.default, b(aten.ge.Scalar, var, lo), b(aten.le.Scalar, var, hi))
    weight = b(aten._to_copy.default, kept, dtype=torch.float32)  # [B, H, 1, 1]
    nkept = b(aten.sum.dim_IntList, weight, [1], True)
    weight = b(aten.add.Tensor, weight, b(aten._to_copy.default, b(aten.eq.Scalar, nkept, 0.0), dtype=torch.float32))
    weight = b(aten.div.Tensor, weight, b(aten.sum.dim_IntList, weight, [1], True))
    # EIR: root mean square over the kept heads.
    importance = b(aten.sqrt.default, b(aten.sum.dim_IntList, b(aten.mul.Tensor, b(aten.mul.Tensor, s, s), weight),
                                        [1]))
    importance = b(aten.view.default, importance, [batch, n])
    score = importance
    drop_by_similarity = int(sim_fraction * (n - keep))
    if drop_by_similarity > 0:
        # S-stage: A = valid tokens below the mean one-iteration score (the paper's lower
        # half, without a data-dependent sort), B = the rest, CLS always in B.
        pre_rms = b(aten.view.default, b(aten.sqrt.default, b(aten.mean.dim, b(aten.mul.Tensor, pre, pre), [1])),
                    [batch, n])
        mean = b(aten.div.Tensor, b(aten.sum.dim_IntList, b(aten.mul.Tensor, pre_rms, validf), [1], True), count)
        in_b = b(aten.logical_or.default, b(aten.logical_and.default, b(aten.ge.Tensor, pre_rms, mean), valid),
                 b(aten.gt.Scalar, first, 0.5))
        cand_a = b(aten.logical_and.default, valid, b(aten.logical_not.default, in_b))
        unit = parts["unit"] = unit_keys(b, keys, shape)
        sim = b(aten.matmul.default, unit, b(aten.transpose.int, unit, 1, 2))  # [B, N, N] key cosine
        parts["similarity"] = sim
        sim = b(aten.masked_fill.Scalar, sim, b(aten.logical_not.default, b(aten.unsqueeze.default, in_b, 1)), -2.0)
        best = b(operator.getitem, b(aten.max.dim, sim, -1), 0)  # max.dim, not amax: TVM imports it
        best = b(aten.masked_fill.Scalar, best, b(aten.logical_not.default, cand_a), -3.0)
        top = b(operator.getitem, b(aten.topk.default, best, drop_by_similarity, -1), 0)
        threshold = b(aten.slice.Tensor, top, 1, drop_by_similarity - 1, drop_by_similarity)
        similar = b(aten.logical_and.default, b(aten.ge.Tensor, best, threshold), cand_a)
        score = b(aten.sub.Tensor, score, b(aten.mul.Tensor, b(aten._to_copy.default, similar, dtype=torch.float32),
                                             10.0))
    # Importance is at most 1: padding goes first, then the similar A tokens; CLS stays.
    score = b(aten.sub.Tensor, score, b(aten.mul.Tensor, b(aten.rsub.Scalar, validf, 1.0), 100.0))
    score = b(aten.add.Tensor, score, b(aten.mul.Tensor, first, 1000.0))
    return b(operator.getitem, b(aten.topk.default, score, keep, -1), 1)
