"""Token Merging (ToMe, Bolya et al., ICLR'23), zero-shot, for encoders with mean or CLS pooling.

``merge_tokens`` rewrites selected layers so that, between the attention and
the feed-forward block, ``r`` tokens are merged away (the FFN and every later
layer run on N − r tokens):
- bipartite soft matching: the tokens entering the FFN are split by position
  parity into A (even) and B (odd); each A token's most cosine-similar B token
  is found on the FFN's input states (on all-MiniLM-L6-v2 these match better
  than the attention keys ToMe uses on ViTs: mean cosine 0.982 against 0.977
  at r = 12 per layer on 256 passages, eager prototype), and the ``r`` A tokens
  with the most similar partner are merged into it; CLS (position 0) is never
  merged and stays first, and padding (keys nobody attends to) goes first;
- the merged state is the size-weighted mean of the group, sizes weight the
  mean pooling and log(size) is added to every later layer's attention logits
  (proportional attention), all through ``merging`` as for
  ``prune_tokens(merge=True)``, and with the same static shapes (N − r is a
  constant; which tokens merge is decided at run time), so the result lowers
  to ONNX Runtime and TVM.
Preconditions are ``prune_tokens``'s (self-attention with key-padding masks
only, no token-indexed output, nothing after a cut that reads a position but
CLS), plus: each selected layer has a feed-forward block, i.e. a second
projection after the attention output's projection and before the next
attention, whose input is a [B, N, D] state.

Approximate: a merged group is carried by one averaged state, so the later
layers and the pooling see its mean instead of its members. The quality
figure (mean cosine of the sentence embedding against the unmerged model) is
measured, as for every approximate pass; ``benchmarks/token_pruning.py`` has
the curve.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from tfcompile import structure
from tfcompile.graph import ModelGraph
from tfcompile.passes.base import Exactness, PassRefused, PassResult, Stage, register_pass
from tfcompile.passes.context import PassContext
from tfcompile.passes.tokens.cut import (CutPlan, CutSite, MergeOptions, TokenCounts, attention_inputs, plan_cuts,
                                         refuse_ambiguous_token_axis)
from tfcompile.passes.tokens.cut_rewrite import apply_cuts

aten = torch.ops.aten

_PROJECTIONS = {aten.linear.default, aten.addmm.default}


def _projection_input(node: torch.fx.Node) -> torch.fx.Node:
    return node.args[1] if node.target is aten.addmm.default else node.args[0]


def ffn_entry(graph: ModelGraph, sdpa: torch.fx.Node, next_sdpa: torch.fx.Node | None) -> torch.fx.Node:
    """The feed-forward block's first projection after ``sdpa`` (the second projection after it)."""
    seen = 0
    started = False
    for node in graph.gm.graph.nodes:
        if node is sdpa:
            started = True
            continue
        if not started:
            continue
        if node is next_sdpa:
            break
        if node.op == "call_function" and node.target in _PROJECTIONS:
            seen += 1
            if seen == 2:
                return node
    raise PassRefused(f"{sdpa.name}: no feed-forward projection after the attention's output projection")


@dataclasses.dataclass(frozen=True)
class BipartiteMatching:
    """ToMe's matching on ``state`` [B, N, D] (the FFN input); emitted at the cut, where the state exists."""

    state: torch.fx.Node

    at_attention = False

    def emit(self, build: structure.GraphBuilder, keys: torch.fx.Node, probs: torch.fx.Node, shape, keep: int,
             parts: dict) -> torch.fx.Node:
        """The kept indices [B, keep], CLS first; ``parts`` receives what merging reuses."""
        b = build
        batch, _, n, _ = shape
        valid = b(aten.gt.Scalar, b(aten.sum.dim_IntList, probs, [1, 2]), 0.0)  # padding: keys nobody reads
        validf = b(aten._to_copy.default, valid, dtype=torch.float32)
        parts["valid"] = validf
        norm = b(aten.clamp_min.default, b(aten.linalg_vector_norm.default, self.state, 2.0, [-1], True), 1e-6)
        unit = parts["unit"] = b(aten.div.Tensor, self.state, norm)
        sim = b(aten.matmul.default, unit, b(aten.transpose.int, unit, 1, 2))  # [B, N, N] cosine
        position = torch.arange(n)
        in_a = (position % 2 == 0) & (position != 0)
        # Only B tokens may receive: an A column scores below any cosine.
        not_b = b.const("tome_not_b", (position % 2 == 0).float() * 3.0)
        sim = parts["similarity"] = b(aten.sub.Tensor, sim, not_b)
        best = b(operator.getitem, b(aten.max.dim, sim, -1), 0)  # max.dim: TVM imports it
        # Drop score: A tokens by their best match, padding A tokens before any; B and CLS never.
        a_mask = b.const("tome_in_a", in_a.float())
        score = b(aten.add.Tensor, best, b(aten.mul.Tensor, b(aten.rsub.Scalar, validf, 1.0), 10.0))
        score = b(aten.mul.Tensor, score, a_mask)
        score = b(aten.sub.Tensor, score, b.const("tome_never", (~in_a).float() * 100.0))
        dropped = b(operator.getitem, b(aten.topk.default, score, n - keep, -1), 1)  # [B, r]
        # Kept tokens in their original order (CLS first): the next layer's A/B split is by slot
        # parity, so the order must not depend on how a runtime breaks ties between equal scores.
        offsets = b.const("tome_row_offsets", (torch.arange(batch) * n).unsqueeze(1))
        flat = b(aten.reshape.default, b(aten.add.Tensor, dropped, offsets), [batch * (n - keep)])
        gone = b(aten.index_put.default, b.const("tome_zeros", torch.zeros(batch * n)), [flat],
                 b.const("tome_ones", torch.ones(batch * (n - keep))))
        gone = b(aten.reshape.default, gone, [batch, n])
        order = b(aten.sub.Tensor, b(aten.mul.Tensor, b(aten.rsub.Scalar, gone, 1.0), float(4 * n)),
                  b.const("tome_positions", position.float()))
        return b(operator.getitem, b(aten.topk.default, order, keep, -1), 1)


def _merge_count(layer: int, r: int, start: torch.fx.Node, state: torch.fx.Node):
    def count(n: int, planned) -> int:
        a_tokens = (n + 1) // 2 - 1
        if not 1 <= r <= a_tokens:
            raise PassRefused(f"layer {layer}: can merge 1..{a_tokens} of {n} tokens (the A half but CLS), not {r}")
        value = planned(state)
        if not isinstance(value, torch.Tensor) or value.dim() != 3 or int(value.shape[1]) != n:
            raise PassRefused(f"{start.name}: the feed-forward input is not a [batch, {n}, hidden] state")
        return n - r

    return count


def _schedule(count: int, r, layers) -> dict[int, int]:
    layers = list(range(count)) if layers is None else sorted(int(layer) % count for layer in layers)
    per_layer = [int(r)] * len(layers) if not isinstance(r, (list, tuple)) else [int(x) for x in r]
    if len(per_layer) != len(layers):
        raise ValueError(f"{len(per_layer)} merge counts for {len(layers)} layers")
    return {layer: x for layer, x in zip(layers, per_layer) if x > 0}


@dataclasses.dataclass(frozen=True)
class MergeTokensPlan:
    cuts: CutPlan
    layers: tuple[int, ...]
    merge_attention: bool


def _plan(graph: ModelGraph, context: PassContext, r=8, layers=None, merge_attention: bool = True,
          merge_states: bool = True) -> MergeTokensPlan:
    sites = attention_inputs(graph)
    refuse_ambiguous_token_axis(sites[0])
    schedule = _schedule(len(sites), r, layers)
    if not schedule:
        raise PassRefused("r = 0: nothing to merge")
    cuts = []
    for layer in sorted(schedule):
        attention = sites[layer].node
        following = sites[layer + 1].node if layer + 1 < len(sites) else None
        start = ffn_entry(graph, attention, following)
        state = _projection_input(start)
        cuts.append(CutSite(layer, attention, start, _merge_count(layer, schedule[layer], start, state),
                            BipartiteMatching(state)))
    plan = plan_cuts(graph, cuts, MergeOptions(bool(merge_attention), bool(merge_states)))
    return MergeTokensPlan(plan, tuple(sorted(schedule)), bool(merge_attention))


@register_pass("merge_tokens", Exactness.APPROXIMATE,
               "ToMe: merge r tokens per layer between attention and FFN by bipartite matching of "
               "FFN-input states; size-weighted states, pooling and attention (static token counts)",
               plan=_plan, stage=Stage.TOKENS, runs_after=("prune_tokens",))
def merge_tokens(graph: ModelGraph, plan: MergeTokensPlan) -> PassResult:
    """Knobs: ``r``: tokens merged per layer (an int, or one per layer); ``layers``: the layers
    (default all); ``merge_attention``: proportional attention; ``merge_states``: averaged states."""
    apply_cuts(graph, plan.cuts)
    pooled = plan.cuts.merge.pooled
    steps = " → ".join(str(c) for c in plan.cuts.tokens)
    how = "ToMe bipartite matching on FFN inputs, size-weighted states"
    how += ", sizes weight the mean pooling" if pooled else ", no mean pooling found"
    how += ", proportional attention" if plan.merge_attention else ""
    record = TokenCounts(plan.layers, plan.cuts.tokens, pooled)
    return PassResult(graph, True, f"merged tokens in layers {list(plan.layers)}: {steps} ({how})", record)
