"""Zero-shot token pruning (Zero-TPrune, Wang, Dedhia & Jha, CVPR'24).

``prune_tokens`` rewrites an encoder so that, after each selected layer, only
``ceil(keep_ratio · N)`` of the N tokens entering that layer go on to the
following layers:
- the selected layer's ``scaled_dot_product_attention`` is rewritten as an
  explicit softmax(QKᵀ·scale + mask)·V, so its probabilities P [B, H, N, N]
  exist as a value (a fused SDPA never materialises them);
- token importance is Weighted PageRank on P per head (s ← Pᵀs from a start
  that gives the first token √N times the weight of the others), a variance
  head filter on the N-scaled scores and an RMS combination of the kept heads;
- S-stage: tokens below the average one-iteration score (set A) are matched by
  cosine similarity of their keys against the rest (set B); the ``sim_fraction``
  of the drop count with the most similar A tokens is dropped first, the rest
  by importance (``importance``);
- padded tokens (keys nobody attends to) rank last and the first token (CLS)
  first; ``topk`` picks K tokens per row at run time and every value that
  crosses the layer boundary and is indexed by token (hidden states, the
  attention mask, the attention_mask input read by mean pooling) is gathered
  with those indices, so masking and pooling stay consistent with the kept set
  (``cut``);
- ``merge=True`` (Token Merging, Bolya et al. 2023, on the same kept set; see
  ``merging``): every token carries a size (1 real, 0 padding); each
  dropped token joins the kept token with the most cosine-similar key (of the
  pruned layer), whose size becomes the group's sum (an accumulating
  ``index_put``), and mean pooling reads the sizes instead of the 0/1 mask
  (Σ w·h / Σ w). ``merge_attention`` (on by default with merge) adds log w to
  the later layers' attention logits, over the unchanged key-padding mask;
  ``merge_states`` (on by default) makes each kept token's state its group's
  size-weighted mean. Sizes and the bias carry from one cut to the next, and
  padding (size 0) never joins a real token, so Σ w stays the real token count.
Shapes stay static (K is a constant per layer; which tokens survive is
data-dependent). Kept tokens are in importance order, CLS first: every op
after the cut is permutation-equivariant over tokens, which the preconditions
below make sure of.

Preconditions (each refusal says why):
- self-attention over the sequence through ``scaled_dot_product_attention``
  whose mask lets every query see the same keys (key padding or none):
  causal or windowed masks are refused, since pruning a decoder's tokens
  changes every later next-token logit and the scores pile up on early tokens;
- no output indexed by token after the first pruned layer (pooled or CLS
  outputs only), no op after the cut that slices the sequence or reads a
  position other than 0, and no shape argument that broadcasts to the
  sequence length (e.g. a position table added after the cut);
- the hidden size differs from the sequence length (axes are told apart by size);
- merge: the pooling mask is found as a [B, N] value that, after the cut, is only
  cast or reshaped, multiplied into [B, N, D] states and summed; when there is
  none (a CLS output) the sizes still drive attention and state averaging and
  the summary says "no mean pooling found".

Approximate: dropped tokens no longer contribute to attention or pooling (with
merge: their mass does, but through their group's state, which the later
layers compute without them); the quality figure is measured (mean cosine of
the embeddings against the unpruned model, see
``tfcompile.knob_search.token_schedule``). On 256 minilm passages of 128
tokens, merge (all three parts) raises it at every multi-cut schedule tried
(0.9 after layers 0–4: 0.9426 → 0.9714, 19.7 % FLOPs cut), a little at one cut
after layer 0 (0.6: 0.9379 → 0.9401, 33.7 %) and lowers it at one cut after
layer 1 (0.5: 0.8913 → 0.8797); size-weighted pooling alone lowers it slightly
everywhere (0.9355 at 0.6 after layer 0): what is lost is mostly the kept
tokens' context in the later layers, not the pooling.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx

from tfcompile import structure
from tfcompile.graph import ModelGraph, refresh_shapes
from tfcompile.passes.base import Exactness, PassRefused, PassResult, Stage, register_pass
from tfcompile.passes.context import PassContext
from tfcompile.passes.tokens import importance
from tfcompile.passes.tokens.cut import (CutPlan, CutSite, MergeOptions, TokenCounts, attention_inputs, plan_cuts,
                                         refuse_ambiguous_token_axis)
from tfcompile.passes.tokens.cut_rewrite import apply_cuts

aten = torch.ops.aten

_LINEAR_INPUT_OPS = {aten.linear.default, aten.addmm.default, aten.matmul.default, aten.mm.default}
_WALK_BACK_OPS = structure.RESHAPE_OPS | {aten.transpose.int, aten.permute.default, aten.contiguous.default,
                                           aten.clone.default, aten.split.Tensor, aten.split_with_sizes.default,
                                           operator.getitem, aten.unbind.int, aten.slice.Tensor,
                                           aten.select.int, aten.mul.Tensor}


def first_reader(site: structure.AttentionSite, order: dict[torch.fx.Node, int]) -> torch.fx.Node:
    """The earliest node of the block that computes this attention's q/k/v (where the cut goes)."""
    found = []
    for arg in site.node.args[:3]:
        node = arg
        while node.op == "call_function" and node.target in _WALK_BACK_OPS and node.target not in _LINEAR_INPUT_OPS:
            node = node.args[0]
        if node.op != "call_function" or node.target not in _LINEAR_INPUT_OPS:
            raise PassRefused(f"{site.node.name}: query/key/value do not come from a projection")
        found.append(node)
    return min(found, key=order.__getitem__)


def default_layers(total: int) -> list[int]:
    """Every layer but the last: the schedule then decides where pruning pays."""
    return list(range(total - 1))


def _keep_count(layer: int, keep: int):
    def count(n: int, planned) -> int:
        if not 1 <= keep <= n:
            raise PassRefused(f"layer {layer}: cannot keep {keep} of {n} tokens")
        return keep

    return count


def plan_schedule(graph: ModelGraph, schedule: dict[int, int], *, iterations: int | None = None,
                  head_range=importance.DEFAULT_HEAD_RANGE, sim_fraction: float = 0.5, cls_weight: str = "sqrt",
                  merge: bool = False, merge_attention: bool = False, merge_states: bool = False) -> CutPlan:
    """The cuts that keep ``schedule[l]`` tokens after layer l (``PassRefused`` when they cannot be made)."""
    sites = structure.attention_sites(graph)
    order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}
    cuts = []
    for layer in sorted(schedule):
        ranking = importance.WeightedPageRank(
            iterations if iterations is not None else importance.default_iterations(layer, len(sites)),
            tuple(head_range), float(sim_fraction), cls_weight, unit_keys=bool(merge))
        cuts.append(CutSite(layer, sites[layer].node, first_reader(sites[layer + 1], order),
                            _keep_count(layer, int(schedule[layer])), ranking))
    options = MergeOptions(bool(merge_attention), bool(merge_states)) if merge else None
    return plan_cuts(graph, cuts, options)


def prune_graph(graph: ModelGraph, schedule: dict[int, int], **knobs) -> list[int]:
    """Prune ``graph`` in place: after layer l keep ``schedule[l]`` tokens. Returns the token counts."""
    plan = plan_schedule(graph, schedule, **knobs)
    apply_cuts(graph, plan)
    refresh_shapes(graph)
    return list(plan.tokens[1:])


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    cuts: CutPlan
    layers: tuple[int, ...]
    merge: bool
    merge_attention: bool
    merge_states: bool


def _ratios(keep_ratio, layers: list[int]) -> list[float]:
    ratios = [float(keep_ratio)] * len(layers) if not isinstance(keep_ratio, (list, tuple)) \
        else [float(r) for r in keep_ratio]
    if len(ratios) != len(layers):
        raise ValueError(f"{len(ratios)} keep ratios for {len(layers)} layers")
    if any(not 0 < r <= 1 for r in ratios):
        raise ValueError(f"keep ratios must lie in (0, 1], got {ratios}")
    return ratios


def _plan(graph: ModelGraph, context: PassContext, keep_ratio=0.7, layers=None, iterations: int | None = None,
          head_range=importance.DEFAULT_HEAD_RANGE, sim_fraction: float = 0.5, cls_weight: str = "sqrt",
          merge: bool = False, merge_attention: bool = True, merge_states: bool = True) -> PrunePlan:
    sites = attention_inputs(graph)
    total = len(sites)
    if total < 2:
        raise PassRefused("one attention layer: pruning after the last layer saves nothing")
    refuse_ambiguous_token_axis(sites[0])
    layers = sorted(int(layer) for layer in (default_layers(total) if layers is None else layers))
    for layer in layers:
        if not 0 <= layer < total - 1:
            raise PassRefused(f"layer {layer} cannot be pruned: choose from 0..{total - 2} "
                              "(pruning after the last attention saves nothing)")
    ratios = _ratios(keep_ratio, layers)
    n = tokens = structure.shape_of(sites[0].node.args[0])[2]
    effective = {}
    for layer, ratio in zip(layers, ratios):
        kept = max(1, math.ceil(ratio * tokens - 1e-9))
        if kept < tokens:
            effective[layer] = kept
        tokens = kept
    if not effective:
        raise PassRefused(f"keep ratio {keep_ratio} keeps all {n} tokens: nothing to prune")
    if cls_weight not in importance.CLS_WEIGHTS:
        raise ValueError(f"cls_weight must be 'sqrt' or 'uniform', got {cls_weight!r}")
    plan = plan_schedule(graph, effective, iterations=iterations, head_range=head_range, sim_fraction=sim_fraction,
                         cls_weight=cls_weight, merge=merge, merge_attention=merge and merge_attention,
                         merge_states=merge and merge_states)
    return PrunePlan(plan, tuple(sorted(effective)), bool(merge), bool(merge_attention), bool(merge_states))


@register_pass("prune_tokens", Exactness.APPROXIMATE,
               "Zero-TPrune: rank tokens by weighted PageRank on the attention probabilities, drop the "
               "least important / most redundant ones after chosen layers (static keep count)",
               plan=_plan, stage=Stage.TOKENS)
def prune_tokens(graph: ModelGraph, plan: PrunePlan) -> PassResult:
    """Knobs: ``keep_ratio``: a float, or one per layer, of the tokens entering each pruned layer that
    survive it; ``layers``: attention layers (0-based) after which to prune, default every layer
    but the last; ``iterations``: WPR iterations (default by depth); ``head_range``: the variance
    head filter; ``sim_fraction``: share of the dropped tokens chosen by key similarity;
    ``merge``: each dropped token hands its size to the most key-similar kept token and mean
    pooling weighs tokens by size (see ``merging``); with it, ``merge_attention`` adds
    log size to later attention logits and ``merge_states`` averages each group's states."""
    apply_cuts(graph, plan.cuts)
    pooled = plan.cuts.merge is not None and plan.cuts.merge.pooled
    steps = " → ".join(str(c) for c in plan.cuts.tokens)
    how = "WPR importance, key-similarity drop"
    if plan.merge:
        how += "; dropped tokens merged into the most similar kept one"
        how += ", sizes weight the mean pooling" if pooled else ", no mean pooling found"
        how += ", proportional attention" if plan.merge_attention else ""
        how += ", size-weighted states" if plan.merge_states else ""
    record = TokenCounts(plan.layers, plan.cuts.tokens, pooled)
    return PassResult(graph, True, f"pruned tokens after layers {list(plan.layers)}: {steps} ({how})", record)
