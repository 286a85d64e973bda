"""Token sizes for a cut that merges instead of dropping (ToMe-style, Bolya et al., ICLR'23).

Used by ``prune_tokens(merge=True)`` on Zero-TPrune's kept set and by
``merge_tokens`` on ToMe's bipartite matching; not a pass by itself. All
static shapes and aten ops that ONNX and TVM Relax import (gather, eq,
max.dim, accumulating index_put, where, log):
- every token carries a size w [B, N]: at the first cut 1 for a real token and
  0 for padding (keys nobody attends to, or a 0 in the pooling mask); every
  dropped token is assigned to the kept token whose key (of the pruned layer,
  all heads) is most cosine-similar, kept tokens to themselves, and the kept
  token's size becomes the sum over its group (an accumulating ``index_put``).
  Tokens of size 0 only ever add 0, and nothing is assigned to a kept token of
  size 0, so padding never merges into real tokens and Σ w' = Σ w = the number
  of real tokens;
- the mean pooling's mask (a [B, N] input that is only cast, reshaped,
  multiplied into the hidden states and summed) reads w' instead of the 0/1
  mask: the pooled embedding is Σ w'·h / Σ w', so a dropped token's mass stays
  in the embedding through the kept token that stands for it;
- proportional attention (ToMe §3): log w' is added to the logits of every
  later layer's keys; the 0/1 (bool or 0/−inf) key-padding mask stays as it
  was and the bias is added to it (a bool mask becomes 0 / the float32 minimum
  first, as the explicit attention does);
- averaged states: the hidden state of a kept token becomes the size-weighted
  mean of its group's states (Σ_group w·h / w') instead of its own.
Sizes, the pooling mask and the bias carry from one cut to the next: a later
cut reads the previous cut's sizes and rebuilds the bias from the key-padding
mask underneath it. Both are tagged in ``node.meta`` so that a later pass on
the rewritten graph (``merge_tokens`` after ``prune_tokens(merge=True)``)
finds them too.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from tfcompile import structure

aten = torch.ops.aten

TAG = "token_merge"  # node.meta key: "weights" (sizes) or "bias" (attention bias)
BASE = "token_merge_mask"  # node.meta key of a bias: the name of the mask under it (None: none)
_CARRY_OPS = {aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
              aten.expand.default, aten.expand_as.default, aten.to.dtype, aten.to.dtype_layout,
              aten.to.device, aten._to_copy.default, aten.clone.default, aten.contiguous.default}
_POOL_READS = {aten.mul.Tensor, aten.sum.dim_IntList, aten.sum.default}
SDPA = aten.scaled_dot_product_attention.default


def unit_keys(build: structure.GraphBuilder, keys: torch.fx.Node, shape) -> torch.fx.Node:
    """Keys [B, H, N, d] as unit vectors over all heads, [B, N, H·d]."""
    batch, heads, n, d = shape
    flat = build(aten.reshape.default, build(aten.permute.default, keys, [0, 2, 1, 3]), [batch, n, heads * d])
    norm = build(aten.clamp_min.default, build(aten.linalg_vector_norm.default, flat, 2.0, [-1], True), 1e-6)
    return build(aten.div.Tensor, flat, norm)


def _reads(value: torch.fx.Node, downstream: set[torch.fx.Node]) -> list[torch.fx.Node] | None:
    """The ops after the cut that read ``value`` through casts and reshapes (None: some are not)."""
    found, stack = [], [u for u in structure.real_users(value) if u in downstream]
    while stack:
        node = stack.pop()
        if node.op != "call_function":
            return None
        if node.target in _CARRY_OPS:
            stack.extend(structure.real_users(node))
        else:
            found.append(node)
    return found


def is_pooling_mask(value: torch.fx.Node, downstream: set[torch.fx.Node], batch: int, n: int) -> bool:
    """A [B, N] value that after the cut is only cast/reshaped, multiplied into a token-indexed
    float tensor and summed (mean pooling's mask)."""
    if structure.shape_of(value) != (batch, n):
        return False
    reads = _reads(value, downstream)
    if not reads or any(r.target not in _POOL_READS for r in reads):
        return False
    for r in reads:
        if r.target is aten.mul.Tensor:
            other = [structure.shape_of(a) for a in r.args[:2] if isinstance(a, torch.fx.Node)]
            if not any(s is not None and len(s) == 3 and s[:2] == (batch, n) for s in other):
                return False
    return any(r.target is aten.mul.Tensor for r in reads)


def is_state(shape: tuple[int, ...], dtype: torch.dtype, batch: int, n: int) -> bool:
    """A [B, N, D] floating value: token states whose merged mean can stand for the group."""
    return dtype.is_floating_point and len(shape) == 3 and tuple(shape[:2]) == (batch, n)


def weights_before(nodes: list[torch.fx.Node], n: int) -> torch.fx.Node | None:
    """The sizes an earlier rewrite left (the last tagged node), if its token count is ``n``."""
    tagged = [v for v in nodes if v.meta.get(TAG) == "weights"]
    if not tagged:
        return None
    shape = structure.shape_of(tagged[-1])
    return tagged[-1] if shape is None or shape[-1] == n else None


def bias_base(graph: torch.fx.Graph, mask: torch.fx.Node | None) -> torch.fx.Node | None:
    """The key-padding mask under a size bias (``mask`` itself when it is no bias)."""
    if not isinstance(mask, torch.fx.Node) or mask.meta.get(TAG) != "bias":
        return mask
    base = mask.meta.get(BASE)
    return None if base is None else next(v for v in graph.nodes if v.name == base)


@dataclasses.dataclass(frozen=True)
class Merge:
    weights: torch.fx.Node  # [B, K] sizes after the cut
    previous: torch.fx.Node  # [B, N] sizes before it
    slot: torch.fx.Node  # [B·N] the row (b·K + kept slot) of the [B·K] kept tokens each token joins
    idx: torch.fx.Node  # [B, K] the kept tokens
    batch: int
    n: int
    keep: int


def _rows(build: structure.GraphBuilder, index: torch.fx.Node, shape: list[int]) -> torch.fx.Node:
    """A [B, M] token index broadcast over the trailing axes of ``shape`` (for gather/scatter)."""
    view = list(shape[:2]) + [1] * (len(shape) - 2)
    return build(aten.expand.default, build(aten.view.default, index, view), list(shape))


def merge_sizes(build: structure.GraphBuilder, previous: torch.fx.Node, unit: torch.fx.Node,
                similarity: torch.fx.Node | None, idx: torch.fx.Node, shape, keep: int) -> Merge:
    """Assign every token to a kept one (itself if kept, else the most key-similar kept token of
    nonzero size) and sum the sizes ``previous`` [B, N] over each group.
    ``similarity``: the [B, N, N] key cosine when the S-stage already has it, else None;
    ``shape``: the pruned attention's [B, H, N, d]."""
    b = build
    batch, heads, n, d = shape
    if similarity is not None:
        sim = b(aten.gather.default, similarity, 2, b(aten.expand.default, b(aten.unsqueeze.default, idx, 1),
                                                      [batch, n, keep]))
    else:
        kept_unit = b(aten.gather.default, unit, 1, _rows(b, idx, [batch, keep, heads * d]))
        sim = b(aten.matmul.default, unit, b(aten.transpose.int, kept_unit, 1, 2))  # [B, N, K] cosine
    positions = b.const("merge_positions", torch.arange(n).unsqueeze(-1))  # [N, 1]
    itself = b(aten.eq.Tensor, b(aten.unsqueeze.default, idx, 1), positions)  # [B, N, K]
    # A kept token is its own group (+4 beats any cosine); nothing joins a kept token of size 0.
    sim = b(aten.add.Tensor, sim, b(aten.mul.Tensor, b(aten._to_copy.default, itself, dtype=torch.float32), 4.0))
    kept_size = b(aten.gather.default, previous, 1, idx)
    empty = b(aten._to_copy.default, b(aten.le.Scalar, kept_size, 0.0), dtype=torch.float32)
    sim = b(aten.sub.Tensor, sim, b(aten.mul.Tensor, b(aten.unsqueeze.default, empty, 1), 16.0))
    target = b(operator.getitem, b(aten.max.dim, sim, -1), 1)  # [B, N]; max.dim, not argmax: TVM imports it
    # Group sums as an accumulating index_put over flat rows (ONNX ScatterND add; TVM's importer
    # takes index_put, not scatter_add).
    offsets = b.const("merge_row_offsets", (torch.arange(batch) * keep).unsqueeze(1))
    slot = b(aten.reshape.default, b(aten.add.Tensor, target, offsets), [batch * n])
    flat = b(aten.index_put.default, b(aten.zeros_like.default, b(aten.reshape.default, kept_size, [batch * keep])),
             [slot], b(aten.reshape.default, previous, [batch * n]), True)
    weights = b(aten.reshape.default, flat, [batch, keep])
    weights.meta[TAG] = "weights"
    return Merge(weights, previous, slot, idx, batch, n, keep)


def average_states(build: structure.GraphBuilder, m: Merge, states: torch.fx.Node, hidden: int) -> torch.fx.Node:
    """[B, K, hidden]: each kept token's state is the size-weighted mean of its group's (its own
    when the group has size 0, i.e. kept padding)."""
    b = build
    own = b(aten.gather.default, states, 1, _rows(b, m.idx, [m.batch, m.keep, hidden]))
    sized = b(aten.mul.Tensor, states, b(aten.unsqueeze.default, m.previous, -1))
    # One index per axis (TVM's index_put wants them): the row, and every column.
    rows = b(aten.view.default, m.slot, [m.batch * m.n, 1])
    columns = b.const("merge_columns", torch.arange(hidden).unsqueeze(0))
    summed = b(aten.index_put.default,
               b(aten.zeros_like.default, b(aten.reshape.default, own, [m.batch * m.keep, hidden])),
               [rows, columns], b(aten.reshape.default, sized, [m.batch * m.n, hidden]), True)
    summed = b(aten.reshape.default, summed, [m.batch, m.keep, hidden])
    size = b(aten.unsqueeze.default, m.weights, -1)
    mean = b(aten.div.Tensor, summed, b(aten.clamp_min.default, size, 1e-6))
    return b(aten.where.self, b(aten.le.Scalar, size, 0.0), own, mean)


def log_sizes(build: structure.GraphBuilder, m: Merge) -> torch.fx.Node:
    """[B, 1, 1, K]: log w' (0 where w' = 0: the key-padding mask already hides those keys)."""
    empty = build(aten._to_copy.default, build(aten.eq.Scalar, m.weights, 0.0), dtype=torch.float32)
    logw = build(aten.log.default, build(aten.add.Tensor, m.weights, empty))
    return build(aten.view.default, logw, [m.batch, 1, 1, m.keep])


def unwrap_biases(graph: torch.fx.Graph, downstream: set[torch.fx.Node]) -> None:
    """Put the plain key-padding masks back under the later attentions (the cut gathers them and
    lays the new sizes' bias over them again)."""
    for node in downstream:
        if node.op != "call_function" or node.target is not SDPA:
            continue
        mask = structure.dim_arg(node, 3, "attn_mask")
        if isinstance(mask, torch.fx.Node) and mask.meta.get(TAG) == "bias":
            set_mask(node, bias_base(graph, mask))


def set_mask(node: torch.fx.Node, mask) -> None:
    if len(node.args) > 3:
        node.update_arg(3, mask)
    else:
        node.update_kwarg("attn_mask", mask)


def proportional_attention(build: structure.GraphBuilder, m: Merge,
                           attentions: dict[torch.fx.Node, torch.dtype | None]) -> None:
    """Lay log w' over the (gathered) mask of every attention in ``attentions`` (each with its
    key-padding mask's dtype, None: no mask)."""
    b = build
    logw = log_sizes(b, m)
    built: dict[object, torch.fx.Node] = {}
    for node in sorted(attentions, key=lambda x: x.name):
        mask = structure.dim_arg(node, 3, "attn_mask")
        key = mask if isinstance(mask, torch.fx.Node) else None
        if key not in built:
            if key is None:
                bias = b(aten.expand.default, logw, [m.batch, 1, m.keep, m.keep])
            else:
                additive = key
                if attentions[node] == torch.bool:
                    # 0 / a large finite fill, as the explicit attention does: no NaN rows.
                    hidden = b(aten._to_copy.default, b(aten.logical_not.default, key), dtype=torch.float32)
                    additive = b(aten.mul.Tensor, hidden, torch.finfo(torch.float32).min)
                bias = b(aten.add.Tensor, additive, logw)
            bias.meta[TAG] = "bias"
            bias.meta[BASE] = None if key is None else key.name
            built[key] = bias
        set_mask(node, built[key])
