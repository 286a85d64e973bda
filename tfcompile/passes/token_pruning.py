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
  by importance;
- padded tokens (keys nobody attends to) rank last and the first token (CLS)
  first; ``topk`` picks K tokens per row at run time and every value that
  crosses the layer boundary and is indexed by token (hidden states, the
  attention mask, the attention_mask input read by mean pooling) is gathered
  with those indices, so masking and pooling stay consistent with the kept set;
- ``merge=True`` (Token Merging, Bolya et al. 2023, on the same kept set; see
  ``token_merging``): every token carries a size (1 real, 0 padding); each
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
the embeddings against the unpruned model, see ``token_pruning_schedule``).
On 256 minilm passages of 128 tokens, merge (all three parts) raises it at
every multi-cut schedule tried (0.9 after layers 0–4: 0.9426 → 0.9714, 19.7 %
FLOPs cut), a little at one cut after layer 0 (0.6: 0.9379 → 0.9401, 33.7 %)
and lowers it at one cut after layer 1 (0.5: 0.8913 → 0.8797); size-weighted
pooling alone lowers it slightly everywhere (0.9355 at 0.6 after layer 0):
what is lost is mostly the kept tokens' context in the later layers, not the
pooling.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.utils._pytree as pytree

from tfcompile.graph import ModelGraph, clone, refresh_shapes
from tfcompile.passes import token_importance, token_merging
from tfcompile import structure
from tfcompile.passes.base import Exactness, PassResult, Stage, register_checked_pass
from tfcompile.passes.packing import Refusal

aten = torch.ops.aten

_SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_LINEAR_INPUT_OPS = {aten.linear.default, aten.addmm.default, aten.matmul.default, aten.mm.default}
_WALK_BACK_OPS = structure.RESHAPE_OPS | {aten.transpose.int, aten.permute.default, aten.contiguous.default,
                                           aten.clone.default, aten.split.Tensor, aten.split_with_sizes.default,
                                           operator.getitem, aten.unbind.int, aten.slice.Tensor,
                                           aten.select.int, aten.mul.Tensor}


# -- analysis -------------------------------------------------------------------------------------

def _attention_inputs(graph: ModelGraph) -> list[structure.AttentionSite]:
    sites = structure.attention_sites(graph)
    if not sites:
        raise Refusal("no scaled_dot_product_attention: token pruning ranks tokens by attention")
    masks = structure.evaluate_nodes(graph, [s.mask for s in sites if s.mask is not None])
    for site in sites:
        q, k = (structure.tensor_meta(a) for a in site.node.args[:2])
        if q is None or k is None or q.dim() != 4 or tuple(q.shape) != tuple(k.shape):
            raise Refusal(f"{site.node.name} is not self-attention with equal query and key shapes "
                          "[batch, heads, sequence, dim]")
        if site.is_causal:
            raise Refusal(f"{site.node.name} is causal: pruning a decoder's tokens changes the "
                          "next-token outputs at every later position")
        value = masks.get(site.mask)
        if value is not None:
            allowed = value if value.dtype == torch.bool else value > torch.finfo(value.dtype).min / 2
            allowed = allowed.expand(*allowed.shape[:-2], q.shape[2], allowed.shape[-1])
            if not bool((allowed == allowed[..., :1, :]).all()):
                raise Refusal(f"{site.node.name} has a mask that differs between queries (causal or "
                              "windowed attention); only key-padding masks keep a token's importance "
                              "meaningful")
            if value.dtype != torch.bool and not bool(((value == 0) | ~allowed).all()):
                raise Refusal(f"{site.node.name} adds a bias to the attention scores")
    return sites


def _first_reader(graph: ModelGraph, site: structure.AttentionSite) -> torch.fx.Node:
    """The earliest node of the block that computes this attention's q/k/v (where the cut goes)."""
    order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}
    found = []
    for arg in site.node.args[:3]:
        node = arg
        while node.op == "call_function" and node.target in _WALK_BACK_OPS and node.target not in _LINEAR_INPUT_OPS:
            node = node.args[0]
        if node.op != "call_function" or node.target not in _LINEAR_INPUT_OPS:
            raise Refusal(f"{site.node.name}: query/key/value do not come from a projection")
        found.append(node)
    return min(found, key=order.__getitem__)


# -- emitted subgraphs ----------------------------------------------------------------------------

def _gather_tokens(e: token_importance.Emitter, value: torch.fx.Node, shape: list[int], axes: list[int], idx: torch.fx.Node,
                   flat_idx: torch.fx.Node, keep: int, batch: int) -> torch.fx.Node:
    """``value`` at the kept tokens along each of ``axes`` (per-row indices ``idx`` [B, keep])."""
    if shape[0] != batch:
        value = e(aten.expand.default, value, [batch] + shape[1:])
        shape = [batch] + shape[1:]
    for axis in axes:
        if axis == 1:
            # Rows of [B·N, rest]: one index per token, not one per element as gather needs.
            rest = shape[2:]
            value = e(aten.reshape.default, value, [batch * shape[1]] + rest)
            value = e(aten.index_select.default, value, 0, flat_idx)
            value = e(aten.reshape.default, value, [batch, keep] + rest)
        else:
            view = [batch] + [1] * (len(shape) - 1)
            view[axis] = keep
            target = list(shape)
            target[axis] = keep
            index = e(aten.expand.default, e(aten.view.default, idx, view), target)
            value = e(aten.gather.default, value, axis, index)
        shape[axis] = keep
    return value


def _shape_of(node) -> list[int]:
    return [int(s) for s in structure.tensor_meta(node).shape]


def _reshaped(src_old: list[int], src_new: list[int], dst_old: list[int]) -> list[int] | None:
    """``dst_old`` with every axis that spans whole input axes resized to their new product."""
    bounds = {}
    acc = 1
    for i, size in enumerate(src_old):
        bounds.setdefault(acc, i)
        acc *= size
    bounds.setdefault(acc, len(src_old))
    dst_new, acc = [], 1
    for size in dst_old:
        lo, hi = acc, acc * size
        acc = hi
        a0 = bounds.get(lo)
        a1 = max((j for j in range(len(src_old) + 1) if math.prod(src_old[:j]) == hi), default=None)
        if a0 is None or a1 is None or a1 < a0:
            changed = [j for j in range(len(src_old)) if src_old[j] != src_new[j]]
            if any(math.prod(src_old[:j]) < hi and math.prod(src_old[:j + 1]) > lo for j in changed):
                return None  # regroups a token axis with others
            dst_new.append(size)
        else:
            dst_new.append(math.prod(src_new[a0:a1]))
    return dst_new


def _as_meta(value):
    # Shape and dtype only: enough for the next cut, without a fake-tensor pass per cut.
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_as_meta(v) for v in value)
    return value


class _Resizer(torch.fx.Interpreter):
    """Runs the graph on its example inputs and, after the cut, rewrites every shape argument
    that still names the old token count; refuses ops that need the dropped positions."""

    def __init__(self, gm: torch.fx.GraphModule, downstream: set[torch.fx.Node], n: int):
        super().__init__(gm)
        self.downstream = downstream
        self.n = n
        self.shapes: dict[torch.fx.Node, object] = {}

    def _changed(self, arg) -> list[int]:
        if not isinstance(arg, torch.fx.Node) or structure.tensor_meta(arg) is None:
            return []
        old, new = _shape_of(arg), list(self.env[arg].shape)
        return [i for i, (a, b) in enumerate(zip(old, new)) if a != b]

    def run_node(self, node: torch.fx.Node):
        if node in self.downstream and node.op == "call_function":
            self._fix(node)
        result = super().run_node(node)
        self.shapes[node] = _as_meta(result)
        return result

    def _fix(self, node: torch.fx.Node) -> None:
        src = node.args[0] if node.args else None
        changed = self._changed(src)
        if not changed:
            return
        target = node.target
        src_old, src_new = _shape_of(src), list(self.env[src].shape)
        if target in _SIZED:
            dst = _reshaped(src_old, src_new, _shape_of(node))
            if dst is None:
                raise Refusal(f"{node.name} reshapes {src_old} to {_shape_of(node)} across the token axis")
            node.update_arg(1, dst)
        elif target is aten.expand.default:
            dst_old = _shape_of(node)
            lead = len(dst_old) - len(src_old)
            sizes = list(node.args[1])
            for i in range(len(dst_old)):
                j = i - lead
                if j >= 0 and j in changed:
                    sizes[i] = src_new[j]
                elif i > 0 and dst_old[i] == self.n and (j < 0 or src_old[j] == 1):
                    raise Refusal(f"{node.name} broadcasts to the sequence length after the pruned layer")
            node.update_arg(1, sizes)
        elif target is aten.slice.Tensor:
            dim = structure.dim_arg(node, 1, "dim", 0) % len(src_old)
            start, end = structure.dim_arg(node, 2, "start"), structure.dim_arg(node, 3, "end")
            if dim in changed and ((start or 0) != 0 or (end is not None and end < src_old[dim])
                                   or structure.dim_arg(node, 4, "step", 1) != 1):
                raise Refusal(f"{node.name} slices the sequence after the pruned layer")
        elif target is aten.select.int:
            dim = node.args[1] % len(src_old)
            if dim in changed and node.args[2] != 0:
                raise Refusal(f"{node.name} reads position {node.args[2]}, which pruning may drop "
                              "(only position 0, CLS, is always kept)")
        elif target in (aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
                        aten.arange.default, aten.full.default):
            raise Refusal(f"{node.name} builds a tensor sized by the sequence after the pruned layer")


def _prune_at(graph: ModelGraph, site: structure.AttentionSite, cut: torch.fx.Node, keep: int, *,
              merge: bool = False, merge_attention: bool = False, merge_states: bool = False,
              select=None, **knobs) -> None:
    """Keep ``keep`` tokens from ``cut`` on. ``select(e, probs, shape, keep, parts)`` (emitted
    before ``cut``) replaces Zero-TPrune's ranking when given (ToMe's bipartite matching)."""
    merge_attention, merge_states = merge and merge_attention, merge and merge_states
    g = graph.gm.graph
    e = token_importance.Emitter(graph)
    shape = _shape_of(site.node.args[0])
    batch, heads, n, d = shape
    dependent = structure.input_dependent_nodes(graph)
    output = next(x for x in g.nodes if x.op == "output")
    expected = [structure.tensor_meta(o) if isinstance(o, torch.fx.Node) else None
                for o in pytree.tree_leaves(output.args[0])]
    parts: dict = {}
    with g.inserting_before(site.node):
        out, probs = token_importance.explicit_attention(e, site)
        if select is None:
            idx = token_importance.keep_indices(e, probs, site.node.args[1], shape, keep, parts=parts, **knobs)
            if merge and "unit" not in parts:
                parts["unit"] = token_merging.unit_keys(e, site.node.args[1], shape)
    if select is not None:
        with g.inserting_before(cut):
            idx = select(e, probs, shape, keep, parts)
    site.node.replace_all_uses_with(out)
    g.erase_node(site.node)
    nodes = list(g.nodes)
    pos = {node: i for i, node in enumerate(nodes)}
    downstream = set(nodes[pos[cut]:])

    def crossing() -> list[torch.fx.Node]:
        # Constants count too (a mask built from arange, as in HF ViT), parameters do not.
        return [v for v in nodes[:pos[cut]] if v.op in ("placeholder", "call_function")
                and structure.tensor_meta(v) is not None and any(u in downstream for u in structure.real_users(v))]

    live = crossing()
    with g.inserting_before(cut):
        offsets = e.const("prune_row_offsets", (torch.arange(batch) * n).unsqueeze(1))
        flat_idx = e(aten.reshape.default, e(aten.add.Tensor, idx, offsets), [batch * keep])
        merged = None
        if merge:
            merged = _merge_at(e, nodes[:pos[cut]], live, downstream, parts, idx, shape, keep)
            if merged.pooled:
                graph.info["token_merge_pooling"] = True
            if merge_attention:
                token_merging.unwrap_biases(g, downstream)
                attentions = token_merging.attention_masks(downstream)
            live = crossing()  # the pooling mask and the old sizes and biases are read no more
        for value in live:
            vshape = _shape_of(value)
            axes = [a for a in range(1, len(vshape)) if vshape[a] == n]
            if not axes:
                continue
            if vshape[0] not in (batch, 1):
                if value not in dependent:
                    continue  # a weight-sized constant, not indexed by (batch, token)
                raise Refusal(f"{value.name} {vshape} crosses the pruned layer without a batch axis")
            if merge_states and vshape[0] == batch and token_merging.is_state(value, batch, n):
                gathered = token_merging.average_states(e, merged, value)
            else:
                gathered = _gather_tokens(e, value, vshape, axes, idx, flat_idx, keep, batch)
            for user in list(value.users):
                if user in downstream:
                    user.replace_input_with(value, gathered)
        if merge_attention:
            token_merging.proportional_attention(e, merged, attentions)
    for node in list(downstream):
        if node.op == "call_function" and node.target in structure.METADATA_OPS:
            g.erase_node(node)  # they assert the old (unpruned) metadata
    remaining = set(g.nodes)
    downstream &= remaining
    graph.gm.recompile()
    resizer = _Resizer(graph.gm, downstream, n)
    try:
        with torch.no_grad():
            outputs = resizer.run(*graph.example_inputs)
    except Refusal:
        raise
    except Exception as exc:  # an op the rewrite does not understand failed on the smaller shapes
        raise Refusal(f"the graph after layer cut at {cut.name} does not run on {keep} tokens: "
                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    graph.gm.recompile()
    for node, value in resizer.shapes.items():
        node.meta["val"] = value
    for out_value, ref in zip(pytree.tree_leaves(outputs), expected):
        if ref is not None and tuple(out_value.shape) != tuple(ref.shape):
            raise Refusal(f"an output ({list(ref.shape)}) is indexed by token: pruning drops tokens, "
                          "so only pooled or CLS outputs can be kept")


def _merge_at(e: token_importance.Emitter, before: list[torch.fx.Node], live: list[torch.fx.Node],
              downstream: set[torch.fx.Node], parts: dict, idx: torch.fx.Node, shape: list[int],
              keep: int) -> token_merging.Merge:
    """Sizes after this cut; the pooling mask (first cut) or the previous sizes now read them."""
    batch, _, n, _ = shape
    previous = token_merging.weights_before(before, n)
    if previous is not None:
        readers = [previous]
        sizes = previous
    else:
        readers = [v for v in live if token_merging.is_pooling_mask(v, downstream, batch, n)]
        sizes = parts["valid"]
        for mask in readers:  # a token outside the pooling mask has no mass to hand on
            sizes = e(aten.mul.Tensor, sizes, e(aten._to_copy.default, mask, dtype=torch.float32))
    merged = token_merging.merge_sizes(e, sizes, parts["unit"], parts.get("similarity"), idx, shape, keep)
    merged.pooled = any(u in downstream for value in readers for u in value.users)
    for value in readers:
        for user in list(value.users):
            if user in downstream:
                user.replace_input_with(value, merged.weights)
    return merged


def _plan(graph: ModelGraph, keep_ratio, layers) -> tuple[list[structure.AttentionSite], list[int], list[float]]:
    sites = _attention_inputs(graph)
    total = len(sites)
    if total < 2:
        raise Refusal("one attention layer: pruning after the last layer saves nothing")
    q = structure.tensor_meta(sites[0].node.args[0])
    if q.shape[1] * q.shape[3] == q.shape[2]:
        raise Refusal("the hidden size equals the sequence length, so the token axis is ambiguous")
    if layers is None:
        layers = default_layers(total)
    layers = sorted(int(layer) for layer in layers)
    for layer in layers:
        if not 0 <= layer < total - 1:
            raise Refusal(f"layer {layer} cannot be pruned: choose from 0..{total - 2} "
                          "(pruning after the last attention saves nothing)")
    ratios = [float(keep_ratio)] * len(layers) if not isinstance(keep_ratio, (list, tuple)) \
        else [float(r) for r in keep_ratio]
    if len(ratios) != len(layers):
        raise Refusal(f"{len(ratios)} keep ratios for {len(layers)} layers")
    if any(not 0 < r <= 1 for r in ratios):
        raise Refusal(f"keep ratios must lie in (0, 1], got {ratios}")
    return sites, layers, ratios


def default_layers(total: int) -> list[int]:
    """Every layer but the last: the schedule then decides where pruning pays."""
    return list(range(total - 1))


def prune_graph(graph: ModelGraph, schedule: dict[int, int], **knobs) -> list[int]:
    """Prune ``graph`` in place: after layer l keep ``schedule[l]`` tokens. Returns the token counts."""
    counts = []
    # Node identities survive each cut (only the pruned layer's SDPA is replaced), indices do not.
    all_sites = structure.attention_sites(graph)
    attention = [s.node for s in all_sites]
    for layer in sorted(schedule):
        sites = {s.node: s for s in structure.attention_sites(graph)}
        site, following = sites[attention[layer]], sites[attention[layer + 1]]
        n = _shape_of(site.node.args[0])[2]
        keep = int(schedule[layer])
        if not 1 <= keep <= n:
            raise Refusal(f"layer {layer}: cannot keep {keep} of {n} tokens")
        cut = _first_reader(graph, following)
        layer_knobs = dict(knobs)
        if layer_knobs.get("iterations") is None:
            layer_knobs["iterations"] = token_importance.default_iterations(layer, len(attention))
        _prune_at(graph, site, cut, keep, **layer_knobs)
        counts.append(keep)
    graph.gm.graph.eliminate_dead_code()
    graph.gm.recompile()
    refresh_shapes(graph)
    return counts


def _schedule(sites, layers: list[int], ratios: list[float]) -> dict[int, int]:
    n = _shape_of(sites[0].node.args[0])[2]
    schedule = {}
    for layer, ratio in zip(layers, ratios):
        n = max(1, math.ceil(ratio * n - 1e-9))
        schedule[layer] = n
    return schedule


def _run(graph: ModelGraph, keep_ratio, layers, iterations, head_range, sim_fraction, cls_weight,
         merge=False, merge_attention=True, merge_states=True) -> PassResult:
    sites, layers, ratios = _plan(graph, keep_ratio, layers)
    schedule = _schedule(sites, layers, ratios)
    n = _shape_of(sites[0].node.args[0])[2]
    prev, effective = n, {}
    for layer in layers:
        if schedule[layer] < prev:
            effective[layer] = schedule[layer]
        prev = schedule[layer]
    if not effective:
        return PassResult(graph, False, f"keep ratio {keep_ratio} keeps all {n} tokens: nothing to prune")
    if cls_weight not in ("sqrt", "uniform"):
        raise Refusal(f"cls_weight must be 'sqrt' or 'uniform', got {cls_weight!r}")
    merging = {}
    if merge:
        merging = dict(merge=True, merge_attention=bool(merge_attention), merge_states=bool(merge_states))
    counts = prune_graph(graph, effective, iterations=iterations, head_range=tuple(head_range),
                         sim_fraction=float(sim_fraction), cls_weight=cls_weight, **merging)
    graph.info["token_pruning"] = {"layers": sorted(effective), "tokens": [n] + counts}
    steps = " → ".join(str(c) for c in [n] + counts)
    how = "WPR importance, key-similarity drop"
    if merge:
        how += "; dropped tokens merged into the most similar kept one"
        how += ", sizes weight the mean pooling" if graph.info.pop("token_merge_pooling", False) \
            else ", no mean pooling found"
        how += ", proportional attention" if merge_attention else ""
        how += ", size-weighted states" if merge_states else ""
    return PassResult(graph, True, f"pruned tokens after layers {sorted(effective)}: {steps} ({how})")


def _check(graph: ModelGraph) -> str | None:
    try:
        # One cut exercises every rule the others use; a full dry run would cost a pass per layer.
        _run(clone(graph), 0.7, [0], None, token_importance.DEFAULT_HEAD_RANGE, 0.5, "sqrt")
    except Refusal as refusal:
        return str(refusal)
    return None


@register_checked_pass("prune_tokens", Exactness.APPROXIMATE,
               "Zero-TPrune: rank tokens by weighted PageRank on the attention probabilities, drop the "
               "least important / most redundant ones after chosen layers (static keep count)", _check, stage=Stage.TOKENS)
def prune_tokens(graph: ModelGraph, keep_ratio=0.7, layers=None, iterations: int | None = None,
                 head_range=token_importance.DEFAULT_HEAD_RANGE, sim_fraction: float = 0.5, cls_weight: str = "sqrt",
                 merge: bool = False, merge_attention: bool = True, merge_states: bool = True) -> PassResult:
    """``keep_ratio``: a float, or one per layer, of the tokens entering each pruned layer that
    survive it; ``layers``: attention layers (0-based) after which to prune, default every layer
    but the last; ``iterations``: WPR iterations (default by depth); ``head_range``: the variance
    head filter; ``sim_fraction``: share of the dropped tokens chosen by key similarity;
    ``merge``: each dropped token hands its size to the most key-similar kept token and mean
    pooling weighs tokens by size (see ``token_merging``); with it, ``merge_attention`` adds
    log size to later attention logits and ``merge_states`` averages each group's states."""
    try:
        # On a copy: a refusal half-way leaves the graph as it came.
        return _run(clone(graph), keep_ratio, layers, iterations, head_range, sim_fraction, cls_weight,
                    merge, merge_attention, merge_states)
    except Refusal as refusal:
        return PassResult(graph, False, str(refusal))
