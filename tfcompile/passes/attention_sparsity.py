"""Hard-attention sparsification: top-k per query (AxFormer) and blockwise local attention (MASFormer).

Both passes rewrite ``aten.scaled_dot_product_attention`` nodes (self-attention
over the token sequence) in selected layers; a "layer" is the i-th attention
node in graph order (negative indices count from the end).

``hard_attention_topk`` (knobs ``k``, ``layers``): the SDPA node becomes
``softmax(QKᵀ·scale + mask)``, then every query keeps only its ``k`` largest
probabilities and zeroes the rest, **without renormalising** (AxFormer), then
``P·V``. Ties with the k-th value are kept too; a query with fewer than ``k``
visible keys keeps all of them, so ``k ≥ S`` is the dense model up to float
rounding. The scores are still the full S×S product and P·V stays a dense
GEMM: on CPU without a sparse kernel this computes *more* than the dense SDPA
(one TopK and one select over S×S), and the cost model says so. It is a
quality-preserving sparsification to pair with a sparse kernel, not a speed-up
here.

``local_attention`` (knobs ``window``, ``sinks``, ``full_layers``, ``layers``, ``block``):
every query sees only the keys within distance ``window`` (keys j with
i − w ≤ j ≤ i for a causal layer, |i − j| ≤ w for a bidirectional one) plus
the first ``sinks`` tokens (default 1: trained encoders park much attention
on [CLS]/BOS, an "attention sink"; Longformer's global tokens and
StreamingLLM's sinks keep them for the same reason; on all-MiniLM-L6-v2 at 512
tokens, window 128, it lifts the embedding cosine from 0.93 to 0.97), and
this is *computed* blockwise, never as a masked S×S product: Q is cut into
nb = ⌈S/b⌉ blocks of b queries ([B·H, nb, b, d]), b = min(w, S) unless the
``block`` knob asks for less; K and V are padded by m = ⌈w/b⌉ blocks on each
side and sliced into the m previous / own (/ m next) blocks of every query
block, and the sink keys are broadcast to every block, all concatenated to
[B·H, nb, (m+1)b ((2m+1)b) + g, d]; one SDPA runs on these tiles with a
constant boolean mask of the same tile shape (band ∪ sinks, each key once; it
also hides the padding when b does not divide S); the output is reshaped
back to [B, H, S, d] (and sliced when padded). Attention work is
B·H·S·((m+1)b + g)·(2d) causal, B·H·S·((2m+1)b + g)·(2d) bidirectional,
instead of B·H·S²·(2d): ∝ S·w. With b = w a bidirectional tile holds 3w keys
for the 2w+1 a query needs; b = w/4 holds 2.25w, in 4× as many tiles. All
shapes are static. Layers listed in ``full_layers`` stay dense (MASFormer keeps full
attention in a few layers).

Preconditions (the plan detects them from the graph and names the node): at
least one SDPA node; for ``local_attention``, a window shorter than the
sequence (w ≥ S − 1 shows every key to every query: the rewrite would only
recompute the dense attention in tiles, so it refuses); 4-D q/k/v of the same batch and heads (no GQA
broadcasting) and no dropout; self-attention (as many keys as queries); and
the node's attention pattern, evaluated on the example inputs, must be "full"
(no mask, or a mask that allows everything) or "causal"
(``is_causal`` or an explicit lower-triangular 0/−∞ or boolean mask, as HF
GPT-2/Llama build it). Padding masks, ALiBi biases and other patterns are
refused: the rewrite does not read the original mask, so a padded batch must
first go through ``remove_padding``. Like every static-shape variant here, the
result is valid for unpadded inputs of the traced length.

Approximate: both change the function (keys outside the window / below the
top-k get weight 0 instead of their softmax weight, and the remaining weights
are not renormalised for top-k). The quality figure (top-1 agreement for
logits, mean cosine otherwise) must be checked against the budget; the layers
to sparsify can be chosen greedily on held-out inputs with
``tfcompile.knob_search.attention_layers.choose_layers`` (AxFormer's rule).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Iterable

import torch
import torch.fx

from tfcompile.graph import ModelGraph
from tfcompile import structure
from tfcompile.passes.base import Exactness, PassRefused, PassResult, Stage, register_pass
from tfcompile.passes.context import PassContext

aten = torch.ops.aten

# Marks nodes this module emitted, so a second application does not rewrite them again.
_MARK = "attention_sparsity"


@dataclasses.dataclass(frozen=True)
class LocalAttentionRecord:
    window: int
    sinks: int
    block: int  # queries per tile
    layers: tuple[int, ...]  # attention layers rewritten (indices in graph order)
    of: int  # attention layers that qualified


@dataclasses.dataclass(frozen=True)
class TopKAttentionRecord:
    k: int
    layers: tuple[int, ...]
    of: int


@dataclasses.dataclass(frozen=True)
class _Qualified:
    """An attention the passes may rewrite, with its pattern on the example inputs."""

    site: structure.AttentionSite
    causal: bool  # else full


@dataclasses.dataclass(frozen=True)
class _LocalPlan:
    layers: tuple[_Qualified, ...]  # the chosen layers
    record: LocalAttentionRecord
    block: int | None  # as asked (each layer caps it at its window and sequence)
    seq: int


@dataclasses.dataclass(frozen=True)
class _TopKPlan:
    layers: tuple[_Qualified, ...]
    record: TopKAttentionRecord


def _scale_of(node: torch.fx.Node, head_dim: int) -> float:
    scale = node.kwargs.get("scale")
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def _pattern(site: structure.AttentionSite, value, seq: int) -> str:
    """'full' or 'causal' from the mask's value on the example inputs, else a refusal."""
    node = site.node
    tril = torch.ones(seq, seq, dtype=torch.bool).tril()
    if value is None:
        allowed = tril if site.is_causal else torch.ones(seq, seq, dtype=torch.bool)
    else:
        if not isinstance(value, torch.Tensor) or value.dim() < 2 \
                or tuple(value.shape[-2:]) not in {(seq, seq), (1, seq)}:
            raise PassRefused(f"{node.name}: attention mask of shape {list(getattr(value, 'shape', []))} "
                              "is not a [.., S, S] self-attention mask")
        if value.dtype == torch.bool:
            allowed = value
        else:
            blocked = value <= torch.finfo(value.dtype).min / 2
            if not bool((blocked | (value == 0)).all()):
                raise PassRefused(f"{node.name} adds a bias to the attention scores (e.g. ALiBi), not a 0/−∞ mask")
            allowed = ~blocked
        allowed = allowed.expand(*allowed.shape[:-2], seq, seq)
        if site.is_causal:
            allowed = allowed & tril
    if bool(allowed.all()):
        return "full"
    if bool((allowed == tril).all()):
        return "causal"
    raise PassRefused(f"{node.name}: on the example inputs the attention mask is neither full nor causal "
                      "(padding or another pattern); run remove_padding first or use unpadded inputs")


def _qualified(graph: ModelGraph) -> list[_Qualified]:
    """Every SDPA node not yet sparsified, with its pattern; refuses when one does not qualify."""
    sites = [s for s in structure.attention_sites(graph) if not s.node.meta.get(_MARK)]
    if not sites:
        if any(s.node.meta.get(_MARK) for s in structure.attention_sites(graph)):
            raise PassRefused("every attention is already sparsified")
        raise PassRefused("no scaled_dot_product_attention node: nothing to sparsify")
    for site in sites:
        node = site.node
        q, k, v = (structure.tensor_meta(a) if isinstance(a, torch.fx.Node) else None for a in node.args[:3])
        if q is None or k is None or v is None:
            raise PassRefused(f"{node.name}: q/k/v shapes unknown")
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise PassRefused(f"{node.name}: q/k/v are not 4-D [batch, heads, seq, dim] "
                              f"({list(q.shape)}, {list(k.shape)}, {list(v.shape)})")
        if tuple(q.shape[:2]) != tuple(k.shape[:2]) or tuple(k.shape[:3]) != tuple(v.shape[:3]):
            raise PassRefused(f"{node.name}: q, k and v differ in batch/heads ({list(q.shape)}, {list(k.shape)}, "
                              f"{list(v.shape)}): grouped-query broadcasting is not supported")
        if q.shape[2] != k.shape[2]:
            raise PassRefused(f"{node.name} is cross-attention ({q.shape[2]} queries, {k.shape[2]} keys): "
                              "only self-attention over the token sequence is sparsified")
        dropout = structure.dim_arg(node, 4, "dropout_p", 0.0)
        if dropout:
            raise PassRefused(f"{node.name} has dropout_p={dropout}")
        if node.kwargs.get("enable_gqa"):
            raise PassRefused(f"{node.name} uses enable_gqa")
    masks = [s.mask for s in sites if s.mask is not None]
    try:
        values = structure.evaluate_nodes(graph, masks) if masks else {}
    except ValueError as exc:
        raise PassRefused(f"{exc} to inspect the attention mask") from exc
    qualified = []
    for site in sites:
        seq = int(structure.tensor_meta(site.node.args[0]).shape[2])
        qualified.append(_Qualified(site, causal=_pattern(site, values.get(site.mask), seq) == "causal"))
    return qualified


def _select(count: int, layers: Iterable[int] | None, exclude: Iterable[int] = ()) -> list[int]:
    def norm(i: int) -> int:
        i = int(i)
        if not -count <= i < count:
            raise ValueError(f"layer {i} out of range: the graph has {count} attention layers")
        return i % count

    excluded = {norm(i) for i in exclude}
    chosen = range(count) if layers is None else sorted({norm(i) for i in layers})
    return [i for i in chosen if i not in excluded]


def _finish(graph: ModelGraph) -> None:
    """Drop what the rewritten attention no longer reads (e.g. the S×S causal-mask construction)."""
    structure.remove_dead_code(graph.gm)


# ---------------------------------------------------------------------------
# local_attention


def band_mask(seq: int, window: int, causal: bool, sinks: int = 0) -> torch.Tensor:
    """The dense [S, S] boolean pattern (reference for tests): key j visible from query i."""
    i = torch.arange(seq).unsqueeze(1)
    j = torch.arange(seq).unsqueeze(0)
    allowed = ((i - j).abs() <= window) | (j < sinks)
    return allowed & (j <= i) if causal else allowed


def covers_sequence(seq: int, window: int, sinks: int = 0, causal: bool = False) -> bool:
    """Whether the band plus sinks shows every key the layer's full or causal pattern shows (nothing to drop).

    The farthest pair a full attention needs is (0, S−1), at distance S−1, which no sink covers unless
    g ≥ S; a causal one needs (S−1, j) for every j ≤ S−1, and the sinks cover j < g, so (S−1, g) decides.
    """
    return window >= seq - 1 - (min(sinks, seq) if causal else 0) or sinks >= seq


def block_geometry(seq: int, window: int, causal: bool, sinks: int = 0,
                   block: int | None = None) -> tuple[int, int, list[int], torch.Tensor]:
    """(block, blocks, neighbour offsets, [1, nb, b, len(offsets)·b + sinks] boolean tile mask)."""
    block = min(block or window, window, seq)
    blocks = -(-seq // block)
    # A query block needs its own block and the m = ⌈w/b⌉ before it (and after, bidirectional):
    # every key within distance w of a query lies there. Smaller blocks waste fewer keys
    # ((2m+1)·b slots against the 2w+1 a query needs) at the price of more, smaller tiles.
    reach = min(-(-window // block), blocks - 1)
    offsets = list(range(-reach, 1 if causal else reach + 1))
    n = torch.arange(blocks).view(blocks, 1, 1)
    i = torch.arange(block).view(1, block, 1)
    slot = torch.arange(len(offsets) * block).view(1, 1, -1)
    qpos = n * block + i
    kpos = n * block + offsets[0] * block + slot
    allowed = (kpos >= 0) & (kpos < seq) & ((qpos - kpos).abs() <= window)
    if causal:
        allowed &= kpos <= qpos
    if sinks:
        # The sink keys 0..g−1 are appended to every tile; each is visible where the band does
        # not already show it (a key counted twice would get twice its softmax weight).
        spos = torch.arange(sinks).view(1, 1, sinks)
        sink = (qpos - spos).abs() > window
        if causal:
            sink &= spos <= qpos
        allowed = torch.cat([allowed, sink.expand(blocks, block, sinks)], dim=-1)
    return block, blocks, offsets, allowed.unsqueeze(0)


def _call(g: torch.fx.Graph, target, *args, **kwargs) -> torch.fx.Node:
    node = g.call_function(target, args, kwargs)
    node.meta[_MARK] = True
    return node


def _rewrite_local(graph: ModelGraph, node: torch.fx.Node, causal: bool, window: int, sinks: int,
                   block: int | None) -> None:
    g = graph.gm.graph
    q, k, v = node.args[:3]
    qv, vv = structure.tensor_meta(q), structure.tensor_meta(v)
    batch, heads, seq, dim = (int(s) for s in qv.shape)
    dv = int(vv.shape[-1])
    bh = batch * heads
    sinks = min(sinks, seq) if window < seq else 0  # a window covering the sequence needs no sink
    block, blocks, offsets, mask = block_geometry(seq, window, causal, sinks, block)
    padded = blocks * block
    tail = padded - seq
    before = -offsets[0] * block
    after = offsets[-1] * block + tail
    mask_name = structure.add_constant(graph.gm, f"local_attention_mask_{node.name}", mask)
    with g.inserting_before(node):
        qp = _call(g, aten.constant_pad_nd.default, q, [0, 0, 0, tail], 0.0) if tail else q
        qb = _call(g, aten.reshape.default, qp, [bh, blocks, block, dim])

        def tiles(x: torch.fx.Node, d: int) -> torch.fx.Node:
            xp = _call(g, aten.constant_pad_nd.default, x, [0, 0, before, after], 0.0) if before or after else x
            parts = []
            for o in offsets:
                start = before + o * block
                part = _call(g, aten.slice.Tensor, xp, 2, start, start + padded) if xp is not x else x
                parts.append(_call(g, aten.reshape.default, part, [bh, blocks, block, d]))
            if sinks:
                head = _call(g, aten.slice.Tensor, x, 2, 0, sinks)
                head = _call(g, aten.reshape.default, head, [bh, 1, sinks, d])
                parts.append(_call(g, aten.expand.default, head, [bh, blocks, sinks, d]))
            return parts[0] if len(parts) == 1 else _call(g, aten.cat.default, parts, 2)

        kb, vb = tiles(k, dim), tiles(v, dv)
        attr = g.get_attr(mask_name)
        out = _call(g, aten.scaled_dot_product_attention.default, qb, kb, vb, attr,
                    scale=_scale_of(node, dim))
        out = _call(g, aten.reshape.default, out, [batch, heads, padded, dv])
        if tail:
            out = _call(g, aten.slice.Tensor, out, 2, 0, seq)
    node.replace_all_uses_with(out)
    g.erase_node(node)


def _plan_local(graph: ModelGraph, context: PassContext, *, window: int = 128, full_layers: Iterable[int] = (),
                layers: Iterable[int] | None = None, sinks: int = 1, block: int | None = None) -> _LocalPlan:
    window, sinks = int(window), int(sinks)
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    if block is not None and int(block) < 1:
        raise ValueError(f"block must be ≥ 1, got {block}")
    if sinks < 0:
        raise ValueError(f"sinks must be ≥ 0, got {sinks}")
    qualified = _qualified(graph)
    chosen = _select(len(qualified), layers, full_layers)
    if not chosen:
        raise PassRefused("no layer selected (every attention layer is in full_layers)")
    seq = int(structure.tensor_meta(qualified[0].site.node.args[0]).shape[2])
    if all(covers_sequence(seq, window, sinks, qualified[i].causal) for i in chosen):
        raise PassRefused(f"window {window} covers all {seq} tokens (every query already sees every key it "
                          "sees now): local attention would change nothing")
    chosen = [i for i in chosen if not covers_sequence(seq, window, sinks, qualified[i].causal)]
    record = LocalAttentionRecord(window, sinks, min(block or window, window, seq), tuple(chosen), len(qualified))
    return _LocalPlan(tuple(qualified[i] for i in chosen), record, block, seq)


@register_pass("local_attention", Exactness.APPROXIMATE,
               "banded (sliding-window) self-attention computed blockwise on [S/w, w, 2w] tiles in all "
               "but the full_layers (MASFormer); attention cost ∝ S·w instead of S²",
               plan=_plan_local, stage=Stage.ATTENTION)
def local_attention(graph: ModelGraph, plan: _LocalPlan) -> PassResult:
    record = plan.record
    for layer in plan.layers:
        _rewrite_local(graph, layer.site.node, layer.causal, record.window, record.sinks, plan.block)
    _finish(graph)
    chosen = list(record.layers)
    return PassResult(graph, True, f"local attention (window {record.window}, {record.sinks} sink tokens, block "
                                   f"{record.block} of {plan.seq} tokens) "
                                   f"in {len(chosen)} of {record.of} layers {chosen}", record)


# ---------------------------------------------------------------------------
# hard_attention_topk


def _rewrite_topk(graph: ModelGraph, site: structure.AttentionSite, k: int) -> None:
    g = graph.gm.graph
    node = site.node
    q, kk, v = node.args[:3]
    seq, dim = (int(s) for s in structure.tensor_meta(q).shape[2:])
    keep = min(k, seq)
    with g.inserting_before(node):
        kt = _call(g, aten.transpose.int, kk, -2, -1)
        scores = _call(g, aten.matmul.default, q, kt)
        scores = _call(g, aten.mul.Tensor, scores, _scale_of(node, dim))
        if site.mask is not None:
            if structure.tensor_meta(site.mask).dtype == torch.bool:
                scores = _call(g, aten.masked_fill.Scalar,
                               scores, _call(g, aten.logical_not.default, site.mask), float("-inf"))
            else:
                scores = _call(g, aten.add.Tensor, scores, site.mask)
        if site.is_causal:
            name = structure.add_constant(graph.gm, f"topk_causal_{node.name}",
                                          ~torch.ones(seq, seq, dtype=torch.bool).tril())
            scores = _call(g, aten.masked_fill.Scalar, scores, g.get_attr(name), float("-inf"))
        probs = _call(g, aten.softmax.int, scores, -1)
        top = _call(g, aten.topk.default, probs, keep, -1)
        values = g.call_function(operator.getitem, (top, 0))
        kth = _call(g, aten.slice.Tensor, values, -1, keep - 1, keep)
        # Keep the probabilities at or above the k-th largest, zero the rest; no renormalisation
        # (AxFormer). Masked keys have probability 0 and stay 0 either way.
        kept = _call(g, aten.ge.Tensor, probs, kth)
        kept = _call(g, aten._to_copy.default, kept, dtype=structure.tensor_meta(q).dtype)
        sparse = _call(g, aten.mul.Tensor, probs, kept)
        out = _call(g, aten.matmul.default, sparse, v)
    node.replace_all_uses_with(out)
    g.erase_node(node)


def _plan_topk(graph: ModelGraph, context: PassContext, *, k: int = 32,
               layers: Iterable[int] | None = None) -> _TopKPlan:
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    qualified = _qualified(graph)
    chosen = _select(len(qualified), layers)
    if not chosen:
        raise PassRefused("no layer selected")
    return _TopKPlan(tuple(qualified[i] for i in chosen), TopKAttentionRecord(k, tuple(chosen), len(qualified)))


@register_pass("hard_attention_topk", Exactness.APPROXIMATE,
               "AxFormer hard attention: after the softmax every query keeps its k largest probabilities "
               "(no renormalisation) in the selected layers; scores stay dense, so it saves nothing without "
               "a sparse kernel", plan=_plan_topk, stage=Stage.ATTENTION)
def hard_attention_topk(graph: ModelGraph, plan: _TopKPlan) -> PassResult:
    record = plan.record
    for layer in plan.layers:
        # An explicit mask is applied as is; is_causal is honoured separately.
        _rewrite_topk(graph, layer.site, record.k)
    _finish(graph)
    chosen = list(record.layers)
    return PassResult(graph, True, f"top-{record.k} hard attention in {len(chosen)} of {record.of} layers {chosen}",
                      record)
