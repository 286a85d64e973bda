"""Planning token cuts: which values cross each cut and which shape arguments change, decided read-only.

A cut keeps K of the N tokens from one node on (its start): the layer's
attention is rewritten to expose its probabilities, a selector picks K tokens
per row at run time, and every value computed before the start and read after
it that is indexed by token (hidden states, attention masks, the pooling mask)
is gathered with the same indices, averaged over merged groups, or replaced by
the merged sizes. K is a constant, so every later shape is static.

``plan_cuts`` decides all of it on the graph as it is: it walks the nodes once,
in order, with fake tensors of the shape and dtype each value will have after
every cut (tensors it creates itself; the graph is not touched). Every
view/reshape/expand after a cut whose input lost tokens gets its new size
argument; every op that needs the dropped positions, or does not run on the
smaller shapes, is a refusal with its reason. ``cut_rewrite.apply_cuts`` then
follows the plan.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import math
from collections.abc import Callable
from typing import Any, NoReturn

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode

from tfcompile import structure
from tfcompile.graph import ModelGraph, fetch_attr
from tfcompile.passes.base import PassRefused
from tfcompile.passes.tokens import merging

aten = torch.ops.aten

_SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_BUILDERS = {aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.arange.default,
             aten.full.default}


def attention_inputs(graph: ModelGraph) -> list[structure.AttentionSite]:
    """The attentions, refused unless each is self-attention with a key-padding mask or none."""
    sites = structure.attention_sites(graph)
    if not sites:
        raise PassRefused("no scaled_dot_product_attention: token pruning ranks tokens by attention")
    masks = structure.evaluate_nodes(graph, [s.mask for s in sites if s.mask is not None])
    for site in sites:
        q, k = (structure.tensor_meta(a) for a in site.node.args[:2])
        if q is None or k is None or q.dim() != 4 or tuple(q.shape) != tuple(k.shape):
            raise PassRefused(f"{site.node.name} is not self-attention with equal query and key shapes "
                              "[batch, heads, sequence, dim]")
        if site.is_causal:
            raise PassRefused(f"{site.node.name} is causal: pruning a decoder's tokens changes the "
                              "next-token outputs at every later position")
        value = masks.get(site.mask)
        if value is not None:
            allowed = value if value.dtype == torch.bool else value > torch.finfo(value.dtype).min / 2
            allowed = allowed.expand(*allowed.shape[:-2], q.shape[2], allowed.shape[-1])
            if not bool((allowed == allowed[..., :1, :]).all()):
                raise PassRefused(f"{site.node.name} has a mask that differs between queries (causal or "
                                  "windowed attention); only key-padding masks keep a token's importance "
                                  "meaningful")
            if value.dtype != torch.bool and not bool(((value == 0) | ~allowed).all()):
                raise PassRefused(f"{site.node.name} adds a bias to the attention scores")
    return sites


def refuse_ambiguous_token_axis(site: structure.AttentionSite) -> None:
    q = structure.tensor_meta(site.node.args[0])
    if q.shape[1] * q.shape[3] == q.shape[2]:
        raise PassRefused("the hidden size equals the sequence length, so the token axis is ambiguous")


class Action(enum.Enum):
    GATHER = "gather"  # the kept tokens' entries (a batch axis of 1 is broadcast first)
    AVERAGE = "average"  # merging: each kept token's state becomes its group's size-weighted mean
    SIZES = "sizes"  # merging: the pooling mask (or earlier sizes) is replaced by the merged sizes


@dataclasses.dataclass(frozen=True)
class Crossing:
    """A value computed before a cut and read after it: what the cut makes of it."""

    value: torch.fx.Node  # as in the graph; a later cut reads what the earlier one made of it
    shape: tuple[int, ...]  # entering this cut
    axes: tuple[int, ...]  # the token axes (N → K)
    action: Action


@dataclasses.dataclass(frozen=True)
class CutSite:
    """What a pass asks for: a cut after ``layer`` from ``start`` on, ranked from ``attention``."""

    layer: int
    attention: torch.fx.Node
    start: torch.fx.Node
    # (tokens entering, planned value of a node) -> tokens kept; refuses a count that does not fit.
    count: Callable[[int, Callable[[torch.fx.Node], Any]], int]
    selector: Any  # emits the kept indices: importance.WeightedPageRank or merge.BipartiteMatching


@dataclasses.dataclass(frozen=True)
class TokenCut:
    layer: int
    attention: torch.fx.Node  # replaced by an explicit softmax(QKᵀ)·V whose probabilities rank the tokens
    start: torch.fx.Node  # the first node that sees ``keep`` tokens
    shape: tuple[int, int, int, int]  # the attention's [batch, heads, tokens entering, head dim]
    keep: int
    mask_is_bool: bool  # of the mask the attention reads when the cut is made
    selector: Any
    crossings: tuple[Crossing, ...]


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    attention: bool  # proportional attention: log size added to later attention logits
    states: bool  # a kept token's state becomes its group's size-weighted mean


@dataclasses.dataclass(frozen=True)
class MergePlan:
    attention: bool
    states: bool
    sizes_from: torch.fx.Node | None  # sizes an earlier rewrite left, else None (start from 1 / 0)
    pooling_masks: tuple[torch.fx.Node, ...]  # [B, N] masks of a mean pooling, read as sizes after the cut
    pooled: bool  # the sizes weight a mean pooling
    mask_dtypes: tuple[tuple[torch.fx.Node, torch.dtype | None], ...]  # later attentions' key-padding masks


@dataclasses.dataclass(frozen=True)
class CutPlan:
    cuts: tuple[TokenCut, ...]
    resized: tuple[tuple[torch.fx.Node, tuple[int, ...]], ...]  # view/reshape/expand and its new size argument
    asserts: tuple[torch.fx.Node, ...]  # metadata asserts after a cut: they name the old shapes
    merge: MergePlan | None

    @property
    def tokens(self) -> tuple[int, ...]:
        """Tokens entering the first cut, then kept after each."""
        return (self.cuts[0].shape[2],) + tuple(c.keep for c in self.cuts)


@dataclasses.dataclass(frozen=True)
class TokenCounts:
    """The record of a token pass: the layers cut and the tokens entering the first, then after each."""

    layers: tuple[int, ...]
    tokens: tuple[int, ...]
    pooled: bool  # merged sizes weight the mean pooling


def reshaped(src_old: list[int], src_new: list[int], dst_old: list[int]) -> list[int] | None:
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


def plan_cuts(graph: ModelGraph, sites: list[CutSite], merge: MergeOptions | None) -> CutPlan:
    """The cuts ``sites`` ask for (in layer order), or ``PassRefused`` with the first reason they cannot be made."""
    return _Planner(graph, sites, merge).plan()


@dataclasses.dataclass(frozen=True)
class _Read:
    value: Any  # fake tensor (or tuple of them, or a Python value) as the reader sees it
    dependent: bool  # on the model inputs
    changed: bool  # shape or dtype differs from the node's recorded one


class _Planner:
    def __init__(self, graph: ModelGraph, sites: list[CutSite], merge: MergeOptions | None):
        self.graph = graph
        self.sites = sites
        self.merge_options = merge
        self.nodes = list(graph.gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.starts = [self.pos[s.start] for s in sites]
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.dependent = structure.input_dependent_nodes(graph)
        self.planned: dict[torch.fx.Node, _Read] = {}  # nodes after a cut that read a changed value
        self.crossed: dict[tuple[torch.fx.Node, int], _Read] = {}  # (value, cut index) -> after the cut
        self.crossings: list[dict[torch.fx.Node, Crossing]] = [{} for _ in sites]
        self.cuts: list[TokenCut] = []
        self.resized: dict[torch.fx.Node, tuple[int, ...]] = {}
        self.asserts: list[torch.fx.Node] = []
        self.merge: MergePlan | None = None
        self.recorded: dict[torch.fx.Node, Any] = {}

    # -- the walk --------------------------------------------------------------------------------

    def plan(self) -> CutPlan:
        self._check_order()
        if self.merge_options is not None:
            self.merge = self._merge_plan()
        output = None
        for node in self.nodes:
            while len(self.cuts) < len(self.sites) and self.pos[node] == self.starts[len(self.cuts)]:
                self._open_cut(len(self.cuts))
            if node.op == "output":
                output = node
            elif self._segment(node) > 0 and node.op != "placeholder" and node.op != "get_attr":
                self._plan_node(node)
        self._check_outputs(output)
        cuts = tuple(dataclasses.replace(cut, crossings=tuple(sorted(found.values(), key=lambda c: self.pos[c.value])))
                     for cut, found in zip(self.cuts, self.crossings))
        return CutPlan(cuts, tuple(self.resized.items()), tuple(self.asserts), self.merge)

    def _check_order(self) -> None:
        previous = -1
        for site, start in zip(self.sites, self.starts):
            if not previous < self.pos[site.attention] < start:
                raise PassRefused(f"layer {site.layer}: {site.attention.name} does not lie between the cut "
                                  f"before it and {site.start.name}, so its cut cannot be placed")
            previous = start

    def _segment(self, node: torch.fx.Node) -> int:
        """How many cuts lie before ``node`` (0: it sees every token)."""
        return bisect.bisect_right(self.starts, self.pos[node])

    def _open_cut(self, index: int) -> None:
        site = self.sites[index]
        query = self._read(site.attention.args[0], index).value
        batch, heads, n, head_dim = (int(s) for s in query.shape)
        keep = site.count(n, self._planned_value)
        mask = structure.dim_arg(site.attention, 3, "attn_mask")
        if self.merge is not None and self.merge.attention and index > 0:
            mask_is_bool = False  # the previous cut laid a float log-size bias over it
        else:
            mask_is_bool = isinstance(mask, torch.fx.Node) and self._read(mask, index).value.dtype == torch.bool
        self.cuts.append(TokenCut(site.layer, site.attention, site.start, (batch, heads, n, head_dim), keep,
                                  mask_is_bool, site.selector, ()))

    def _planned_value(self, node: torch.fx.Node):
        return self._read(node, self._segment(node)).value

    def _plan_node(self, node: torch.fx.Node) -> None:
        if node.op == "call_function" and node.target in structure.METADATA_OPS:
            self.asserts.append(node)
            return
        segment = self._segment(node)
        args, kwargs = self._effective_args(node)
        reads: list[_Read] = []

        def read(arg: torch.fx.Node):
            found = self._read(arg, segment)
            reads.append(found)
            return found.value

        args, kwargs = torch.fx.node.map_arg((args, kwargs), read)
        dependent = node in self.dependent or (node.target not in structure.SHAPE_ONLY_OPS
                                               and any(r.dependent for r in reads))
        if not any(r.changed for r in reads):
            if dependent != (node in self.dependent):
                self.planned[node] = _Read(self._recorded(node), dependent, False)
            return
        if node.op != "call_function":
            self._refuse_run(node, RuntimeError(f"{node.op} {node.target} cannot be planned"))
        args = self._resize(node, list(args), segment)
        try:
            with self.mode, torch.no_grad():
                value = node.target(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (any op's own error on the smaller fake shapes is the reason)
            self._refuse_run(node, exc)
        self.planned[node] = _Read(value, dependent, _differs(value, node.meta.get("val")))

    def _effective_args(self, node: torch.fx.Node):
        """Later attentions read the key-padding mask under an earlier size bias: each cut lays its own."""
        args, kwargs = node.args, node.kwargs
        if (self.merge is not None and self.merge.attention and node.op == "call_function"
                and node.target is merging.SDPA):
            mask = structure.dim_arg(node, 3, "attn_mask")
            base = merging.bias_base(self.graph.gm.graph, mask)
            if base is not mask:
                if len(args) > 3:
                    args = args[:3] + (base,) + args[4:]
                else:
                    kwargs = {**kwargs, "attn_mask": base}
        return args, kwargs

    def _refuse_run(self, node: torch.fx.Node, exc: Exception) -> NoReturn:
        first = self.cuts[0]
        raise PassRefused(f"the graph after layer cut at {first.start.name} does not run on {first.keep} tokens: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc

    def _check_outputs(self, output: torch.fx.Node) -> None:
        segment = len(self.sites)
        for leaf in pytree.tree_leaves(output.args[0]):
            if not isinstance(leaf, torch.fx.Node) or structure.tensor_meta(leaf) is None:
                continue
            value = self._read(leaf, segment).value
            ref = structure.tensor_meta(leaf)
            if tuple(value.shape) != tuple(ref.shape):
                raise PassRefused(f"an output ({list(ref.shape)}) is indexed by token: pruning drops tokens, "
                                  "so only pooled or CLS outputs can be kept")

    # -- values as later nodes read them ---------------------------------------------------------

    def _read(self, node: torch.fx.Node, segment: int) -> _Read:
        """``node``'s value as a node ``segment`` cuts deep reads it."""
        found = self.planned.get(node) or _Read(self._recorded(node), node in self.dependent, False)
        for index in range(self._segment(node), segment):
            key = (node, index)
            if key not in self.crossed:
                self.crossed[key] = self._cross(node, index, found)
            found = self.crossed[key]
        return found

    def _cross(self, node: torch.fx.Node, index: int, found: _Read) -> _Read:
        """What cut ``index`` makes of ``node`` (as ``found`` before it)."""
        if node.op not in ("placeholder", "call_function") or structure.tensor_meta(node) is None:
            return found  # parameters and non-tensors are not indexed by (batch, token)
        cut = self.cuts[index]
        batch, _, n, _ = cut.shape
        shape = tuple(int(s) for s in found.value.shape)
        merge = self.merge
        if merge is not None and node in (merge.pooling_masks + ((merge.sizes_from,) if merge.sizes_from else ())):
            self.crossings[index][node] = Crossing(node, shape, (), Action.SIZES)
            return _Read(self._fake((batch, cut.keep), torch.float32), True, True)
        axes = tuple(a for a in range(1, len(shape)) if shape[a] == n)
        if not axes:
            return found
        if shape[0] not in (batch, 1):
            if not found.dependent:
                return found  # a weight-sized constant, not indexed by (batch, token)
            raise PassRefused(f"{node.name} {list(shape)} crosses the pruned layer without a batch axis")
        action = Action.GATHER
        if (merge is not None and merge.states and shape[0] == batch
                and merging.is_state(shape, found.value.dtype, batch, n)):
            action = Action.AVERAGE
        self.crossings[index][node] = Crossing(node, shape, axes, action)
        new = [batch] + list(shape[1:])
        for axis in axes:
            new[axis] = cut.keep
        return _Read(self._fake(new, found.value.dtype), True, True)

    def _recorded(self, node: torch.fx.Node):
        """``node``'s value as recorded in its metadata (a parameter's own shape when there is none)."""
        if node not in self.recorded:
            value = node.meta.get("val")
            if value is None and node.op == "get_attr":
                value = fetch_attr(self.graph.gm, node.target)
            self.recorded[node] = self._like(value)
        return self.recorded[node]

    def _like(self, value):
        if isinstance(value, torch.Tensor):
            with self.mode:
                return torch.empty_strided(tuple(value.shape), tuple(value.stride()), dtype=value.dtype)
        if isinstance(value, (tuple, list)):
            return type(value)(self._like(v) for v in value)
        return value

    def _fake(self, shape, dtype: torch.dtype) -> torch.Tensor:
        with self.mode:
            return torch.empty(tuple(shape), dtype=dtype)

    # -- shape arguments ---------------------------------------------------------------------------

    def _resize(self, node: torch.fx.Node, args: list, segment: int) -> list:
        """``node``'s arguments for the smaller shapes; refuses ops that need the dropped positions."""
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or structure.tensor_meta(src) is None:
            return args
        src_old = list(structure.shape_of(src))
        src_new = [int(s) for s in args[0].shape]
        changed = [i for i, (a, b) in enumerate(zip(src_old, src_new)) if a != b]
        if not changed:
            return args
        target = node.target
        dst_old = list(structure.shape_of(node) or ())
        if target in _SIZED:
            dst = reshaped(src_old, src_new, dst_old)
            if dst is None:
                raise PassRefused(f"{node.name} reshapes {src_old} to {dst_old} across the token axis")
            args[1] = dst
            self._record_size(node, dst)
        elif target is aten.expand.default:
            lead = len(dst_old) - len(src_old)
            sizes = list(node.args[1])
            for i in range(len(dst_old)):
                j = i - lead
                if j >= 0 and j in changed:
                    sizes[i] = src_new[j]
                elif (i > 0 and dst_old[i] in [c.shape[2] for c in self.cuts[:segment]]
                      and (j < 0 or src_old[j] == 1)):
                    raise PassRefused(f"{node.name} broadcasts to the sequence length after the pruned layer")
            args[1] = sizes
            self._record_size(node, sizes)
        elif target is aten.slice.Tensor:
            dim = structure.dim_arg(node, 1, "dim", 0) % len(src_old)
            start, end = structure.dim_arg(node, 2, "start"), structure.dim_arg(node, 3, "end")
            if dim in changed and ((start or 0) != 0 or (end is not None and end < src_old[dim])
                                   or structure.dim_arg(node, 4, "step", 1) != 1):
                raise PassRefused(f"{node.name} slices the sequence after the pruned layer")
        elif target is aten.select.int:
            dim = node.args[1] % len(src_old)
            if dim in changed and node.args[2] != 0:
                raise PassRefused(f"{node.name} reads position {node.args[2]}, which pruning may drop "
                                  "(only position 0, CLS, is always kept)")
        elif target in _BUILDERS:
            raise PassRefused(f"{node.name} builds a tensor sized by the sequence after the pruned layer")
        return args

    def _record_size(self, node: torch.fx.Node, sizes: list[int]) -> None:
        if list(node.args[1]) != list(sizes):
            self.resized[node] = tuple(sizes)

    # -- merging -----------------------------------------------------------------------------------

    def _merge_plan(self) -> MergePlan:
        """Where the sizes start (an earlier rewrite's, or the pooling mask's) and the later masks' dtypes."""
        first = self.sites[0]
        batch, _, n, _ = structure.shape_of(first.attention.args[0])
        before = self.nodes[:self.starts[0]]
        downstream = set(self.nodes[self.starts[0]:])
        previous = merging.weights_before(before, n)
        pooling: tuple[torch.fx.Node, ...] = ()
        if previous is not None:
            pooled = any(u in downstream for u in previous.users)
        else:
            live = [v for v in before if v.op in ("placeholder", "call_function")
                    and structure.tensor_meta(v) is not None
                    and any(u in downstream for u in structure.real_users(v))]
            pooling = tuple(v for v in live if merging.is_pooling_mask(v, downstream, batch, n))
            pooled = any(u in downstream for v in pooling for u in v.users)
        dtypes = []
        for node in self.nodes[self.starts[0]:]:
            if node.op == "call_function" and node.target is merging.SDPA:
                base = merging.bias_base(self.graph.gm.graph, structure.dim_arg(node, 3, "attn_mask"))
                meta = structure.tensor_meta(base) if isinstance(base, torch.fx.Node) else None
                dtypes.append((node, None if not isinstance(base, torch.fx.Node)
                               else (meta.dtype if meta is not None else torch.float32)))
        options = self.merge_options
        return MergePlan(options.attention, options.states, previous, pooling, pooled, tuple(dtypes))


def _differs(planned, recorded) -> bool:
    if isinstance(planned, torch.Tensor):
        return (not isinstance(recorded, torch.Tensor) or tuple(planned.shape) != tuple(recorded.shape)
                or planned.dtype != recorded.dtype)
    if isinstance(planned, (tuple, list)):
        return (not isinstance(recorded, (tuple, list)) or len(planned) != len(recorded)
                or any(_differs(p, r) for p, r in zip(planned, recorded)))
    return False
