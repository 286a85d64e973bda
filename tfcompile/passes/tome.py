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
  (proportional attention), all through ``token_merging`` as for
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

import operator

import torch
import torch.fx

from tfcompile.graph import ModelGraph, clone, refresh_shapes
from tfcompile import structure
from tfcompile.passes.base import Exactness, PassResult, Stage, register_checked_pass
from tfcompile.passes.packing import Refusal
from tfcompile.passes.token_pruning import _attention_inputs, _prune_at, _shape_of

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
    raise Refusal(f"{sdpa.name}: no feed-forward projection after the attention's output projection")


def bipartite_select(state: torch.fx.Node, r: int):
    """Emits ToMe's matching on ``state`` [B, N, D]; returns the kept indices [B, N − r], CLS first."""

    def select(e, probs: torch.fx.Node, shape, keep: int, parts: dict) -> torch.fx.Node:
        batch, _, n, _ = shape
        valid = e(aten.gt.Scalar, e(aten.sum.dim_IntList, probs, [1, 2]), 0.0)  # padding: keys nobody reads
        validf = e(aten._to_copy.default, valid, dtype=torch.float32)
        parts["valid"] = validf
        norm = e(aten.clamp_min.default, e(aten.linalg_vector_norm.default, state, 2.0, [-1], True), 1e-6)
        unit = parts["unit"] = e(aten.div.Tensor, state, norm)
        sim = e(aten.matmul.default, unit, e(aten.transpose.int, unit, 1, 2))  # [B, N, N] cosine
        position = torch.arange(n)
        in_a = (position % 2 == 0) & (position != 0)
        # Only B tokens may receive: an A column scores below any cosine.
        not_b = e.const("tome_not_b", (position % 2 == 0).float() * 3.0)
        sim = parts["similarity"] = e(aten.sub.Tensor, sim, not_b)
        best = e(operator.getitem, e(aten.max.dim, sim, -1), 0)  # max.dim: TVM imports it
        # Drop score: A tokens by their best match, padding A tokens before any; B and CLS never.
        a_mask = e.const("tome_in_a", in_a.float())
        score = e(aten.add.Tensor, best, e(aten.mul.Tensor, e(aten.rsub.Scalar, validf, 1.0), 10.0))
        score = e(aten.mul.Tensor, score, a_mask)
        score = e(aten.sub.Tensor, score, e.const("tome_never", (~in_a).float() * 100.0))
        dropped = e(operator.getitem, e(aten.topk.default, score, n - keep, -1), 1)  # [B, r]
        # Kept tokens in their original order (CLS first): the next layer's A/B split is by slot
        # parity, so the order must not depend on how a runtime breaks ties between equal scores.
        offsets = e.const("tome_row_offsets", (torch.arange(batch) * n).unsqueeze(1))
        flat = e(aten.reshape.default, e(aten.add.Tensor, dropped, offsets), [batch * (n - keep)])
        gone = e(aten.index_put.default, e.const("tome_zeros", torch.zeros(batch * n)), [flat],
                 e.const("tome_ones", torch.ones(batch * (n - keep))))
        gone = e(aten.reshape.default, gone, [batch, n])
        order = e(aten.sub.Tensor, e(aten.mul.Tensor, e(aten.rsub.Scalar, gone, 1.0), float(4 * n)),
                  e.const("tome_positions", position.float()))
        return e(operator.getitem, e(aten.topk.default, order, keep, -1), 1)

    return select


def merge_graph(graph: ModelGraph, merged_per_layer: dict[int, int], *, merge_attention: bool = True,
                merge_states: bool = True) -> list[int]:
    """Merge ``merged_per_layer[l]`` tokens in layer l, in place. Returns the token counts after each."""
    attention = [s.node for s in _attention_inputs(graph)]
    counts = []
    for layer in sorted(merged_per_layer):
        sites = {s.node: s for s in structure.attention_sites(graph)}
        site = sites[attention[layer]]
        following = attention[layer + 1] if layer + 1 < len(attention) else None
        n = _shape_of(site.node.args[0])[2]
        r = int(merged_per_layer[layer])
        a_tokens = (n + 1) // 2 - 1
        if not 1 <= r <= a_tokens:
            raise Refusal(f"layer {layer}: can merge 1..{a_tokens} of {n} tokens (the A half but CLS), not {r}")
        cut = ffn_entry(graph, site.node, following)
        state = _projection_input(cut)
        meta = structure.tensor_meta(state)
        if meta is None or meta.dim() != 3 or int(meta.shape[1]) != n:
            raise Refusal(f"{cut.name}: the feed-forward input is not a [batch, {n}, hidden] state")
        _prune_at(graph, site, cut, n - r, merge=True, merge_attention=merge_attention,
                  merge_states=merge_states, select=bipartite_select(state, r))
        counts.append(n - r)
    graph.gm.graph.eliminate_dead_code()
    graph.gm.recompile()
    refresh_shapes(graph)
    return counts


def _schedule(count: int, n: int, r, layers) -> dict[int, int]:
    layers = list(range(count)) if layers is None else sorted(int(layer) % count for layer in layers)
    per_layer = [int(r)] * len(layers) if not isinstance(r, (list, tuple)) else [int(x) for x in r]
    if len(per_layer) != len(layers):
        raise Refusal(f"{len(per_layer)} merge counts for {len(layers)} layers")
    return {layer: x for layer, x in zip(layers, per_layer) if x > 0}


def _run(graph: ModelGraph, r, layers, merge_attention: bool, merge_states: bool) -> PassResult:
    sites = _attention_inputs(graph)
    n = _shape_of(sites[0].node.args[0])[2]
    q = structure.tensor_meta(sites[0].node.args[0])
    if q.shape[1] * q.shape[3] == n:
        raise Refusal("the hidden size equals the sequence length, so the token axis is ambiguous")
    schedule = _schedule(len(sites), n, r, layers)
    if not schedule:
        return PassResult(graph, False, "r = 0: nothing to merge")
    counts = merge_graph(graph, schedule, merge_attention=merge_attention, merge_states=merge_states)
    graph.info["token_merging"] = {"layers": sorted(schedule), "tokens": [n] + counts}
    pooled = graph.info.pop("token_merge_pooling", False)
    steps = " → ".join(str(c) for c in [n] + counts)
    how = "ToMe bipartite matching on FFN inputs, size-weighted states"
    how += ", sizes weight the mean pooling" if pooled else ", no mean pooling found"
    how += ", proportional attention" if merge_attention else ""
    return PassResult(graph, True, f"merged tokens in layers {sorted(schedule)}: {steps} ({how})")


def _check(graph: ModelGraph) -> str | None:
    try:
        _run(clone(graph), 1, [0], True, True)
    except Refusal as refusal:
        return str(refusal)
    return None


@register_checked_pass("merge_tokens", Exactness.APPROXIMATE,
               "ToMe: merge r tokens per layer between attention and FFN by bipartite matching of "
               "FFN-input states; size-weighted states, pooling and attention (static token counts)", _check, stage=Stage.TOKENS, runs_after=('prune_tokens',))
def merge_tokens(graph: ModelGraph, r=8, layers=None, merge_attention: bool = True,
                 merge_states: bool = True) -> PassResult:
    try:
        return _run(graph, r, layers, bool(merge_attention), bool(merge_states))
    except Refusal as refusal:
        return PassResult(graph, False, str(refusal))

