"""GEMMs with constant weights, FFN blocks and chains of linear maps (structured FFNs)."""

from __future__ import annotations

import dataclasses
from operator import getitem as _getitem

import torch
import torch.fx

from tfcompile.graph import ModelGraph, fetch_attr
from tfcompile.structure.core import input_dependent_nodes, module_path
from tfcompile.structure.shapes import dim_arg, prod, shape_of
from tfcompile.structure.stream import RESHAPE_OPS, is_passthrough, real_users

aten = torch.ops.aten


# ---------------------------------------------------------------------------
# GEMMs with constant weights, FFN blocks and chains of linear maps
# (structure_ffn, premerge_ffn).


@dataclasses.dataclass(frozen=True)
class GemmSite:
    """``aten.linear(x, W, b)`` (W is out×in) or GPT-2's Conv1D ``aten.addmm(b, x, W)`` (W is in×out).

    W and b are model attributes; ``input`` is the dynamic operand."""

    node: torch.fx.Node
    kind: str  # "linear" | "addmm"
    input: torch.fx.Node
    weight_target: str
    bias_target: str | None

    def weight(self, graph: ModelGraph) -> torch.Tensor:
        """The weight as out×in, whatever the op's own layout."""
        w = fetch_attr(graph.gm, self.weight_target)
        return w.t() if self.kind == "addmm" else w

    def bias(self, graph: ModelGraph) -> torch.Tensor | None:
        return None if self.bias_target is None else fetch_attr(graph.gm, self.bias_target)

    @property
    def tokens(self) -> int:
        """Rows of the GEMM: every leading axis of the input counts as tokens."""
        shape = shape_of(self.input) or (0,)
        return prod(shape[:-1])


def _attr(value) -> bool:
    return isinstance(value, torch.fx.Node) and value.op == "get_attr"


def gemm_site(node: torch.fx.Node) -> GemmSite | None:
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        x, w, b = node.args[0], node.args[1], dim_arg(node, 2, "bias")
        if isinstance(x, torch.fx.Node) and _attr(w) and (b is None or _attr(b)):
            return GemmSite(node, "linear", x, w.target, None if b is None else b.target)
    if node.target is aten.addmm.default and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
        b, x, w = node.args[:3]
        if isinstance(x, torch.fx.Node) and not _attr(x) and _attr(w) and _attr(b):
            return GemmSite(node, "addmm", x, w.target, b.target)
    return None


def gemm_sites(graph: ModelGraph) -> list[GemmSite]:
    return [s for s in (gemm_site(n) for n in graph.call_nodes()) if s is not None]


# Ops an FFN's hidden activation may pass through between its up and down
# projections: pointwise maths (the activation itself, GLU gating) and views.
_POINTWISE_OPS = {
    aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
    aten.erf.default, aten.exp.default, aten.neg.default, aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor,
    aten.add.Scalar, aten.sub.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar, aten.hardswish.default,
    aten.leaky_relu.default, aten.softplus.default, aten.mish.default, aten.relu6.default,
    aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default,
}
# A nonlinearity must sit between the projections, else the pair is a linear chain.
_NONLINEAR_OPS = {
    aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
    aten.erf.default, aten.exp.default, aten.hardswish.default, aten.leaky_relu.default,
    aten.softplus.default, aten.mish.default, aten.relu6.default, aten.hardtanh.default,
    aten.clamp.default, aten.clamp_min.default,
}
_SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.slice.Tensor}


@dataclasses.dataclass(frozen=True)
class FFNBlock:
    """Up (and gate) projections → pointwise activation → down projection."""

    ups: tuple[GemmSite, ...]  # in graph order; one node when gate/up were merged
    down: GemmSite
    hidden: tuple[torch.fx.Node, ...]  # the activation subgraph between them

    @property
    def name(self) -> str:
        return module_path(self.down.node) or self.down.node.name

    @property
    def sites(self) -> tuple[GemmSite, ...]:
        return self.ups + (self.down,)


def _strip_views(node: torch.fx.Node) -> torch.fx.Node:
    while node.op == "call_function" and (node.target in RESHAPE_OPS or is_passthrough(node)):
        node = node.args[0]
    return node


def ffn_blocks(graph: ModelGraph) -> list[FFNBlock]:
    """Every FFN block, found from its down projection backwards.

    The hidden activation must be computed from the up projections alone
    (pointwise ops, views, splits of a merged gate/up GEMM) and read by
    nothing but the down projection, so replacing any of the three GEMMs
    touches nothing else."""
    dependent = input_dependent_nodes(graph)
    sites = {s.node: s for s in gemm_sites(graph)}
    order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}
    blocks = []
    for down in sites.values():
        ups: dict[torch.fx.Node, GemmSite] = {}
        hidden: set[torch.fx.Node] = set()
        nonlinear, ok = False, True
        stack = [down.input]
        while stack and ok:
            node = stack.pop()
            if node in sites:
                ups[node] = sites[node]
                continue
            if node in hidden:
                continue
            is_op = node.op == "call_function"
            if is_op and node.target is aten.mul.Tensor and all(a in dependent for a in node.args[:2]
                                                                if isinstance(a, torch.fx.Node)) \
                    and sum(isinstance(a, torch.fx.Node) for a in node.args[:2]) == 2:
                nonlinear = True  # a product of two activations: GLU gating, or x·tanh(...) in GELU
            if not is_op or not (node.target in _POINTWISE_OPS or node.target in RESHAPE_OPS
                                 or node.target in _SPLIT_OPS or node.target is _getitem
                                 or is_passthrough(node)):
                ok = False
                break
            nonlinear |= node.target in _NONLINEAR_OPS
            hidden.add(node)
            stack.extend(a for a in node.all_input_nodes if a in dependent)
        if not ok or not ups or not nonlinear:
            continue
        ups_sorted = sorted(ups.values(), key=lambda s: order[s.node])
        if len({_strip_views(s.input) for s in ups_sorted}) != 1:
            continue
        inside = hidden | {down.node}
        if any(u not in inside for n in list(hidden) + [s.node for s in ups_sorted] for u in real_users(n)):
            continue  # the hidden activation is read elsewhere (an exported tap, another branch)
        blocks.append(FFNBlock(tuple(ups_sorted), down, tuple(sorted(hidden, key=order.__getitem__))))
    return blocks


# Ops that are affine in their one input-dependent operand and never mix
# token rows by themselves (whether a whole chain is token-wise is checked
# numerically by the pass that merges it).
_CHAIN_VIEW_OPS = RESHAPE_OPS | {aten.transpose.int, aten.permute.default, aten.t.default,
                                 aten.contiguous.default, aten.clone.default, aten.alias.default}
CHAIN_GEMM_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default,
                   aten.matmul.default, aten.einsum.default}
_CHAIN_AFFINE_OPS = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar,
                     aten.div.Scalar, aten.add.Scalar, aten.neg.default}


@dataclasses.dataclass(frozen=True)
class LinearChain:
    """A path of ops, each affine in the previous one, with two or more constant-weight GEMMs.

    Every node but the last is read only by the next one. ``entry`` is what
    the first node reads."""

    entry: torch.fx.Node
    nodes: tuple[torch.fx.Node, ...]
    gemms: tuple[int, ...]  # indices into ``nodes`` of the GEMMs

    @property
    def name(self) -> str:
        return module_path(self.nodes[self.gemms[-1]]) or self.nodes[self.gemms[-1]].name


def _chain_arg(node: torch.fx.Node, dependent: set[torch.fx.Node]) -> torch.fx.Node | None:
    """The one input-dependent operand of an affine op (None if the op is not one)."""
    if node.op != "call_function" or node not in dependent:
        return None
    dyn = list(dict.fromkeys(a for a in node.all_input_nodes if a in dependent))
    if len(dyn) != 1:
        return None
    target = node.target
    if target in _CHAIN_VIEW_OPS or is_passthrough(node) or target in CHAIN_GEMM_OPS:
        return dyn[0]
    if target in _CHAIN_AFFINE_OPS:
        # c / x is not linear in x; x ± c, c·x and x / c are.
        return None if target in (aten.div.Tensor, aten.div.Scalar) and node.args[0] is not dyn[0] else dyn[0]
    return None


def linear_chains(graph: ModelGraph) -> list[LinearChain]:
    """Maximal chains of affine ops that contain at least two GEMMs with constant weights."""
    dependent = input_dependent_nodes(graph)
    chains, seen = [], set()
    for node in graph.call_nodes():
        if node in seen or node.target not in CHAIN_GEMM_OPS or _chain_arg(node, dependent) is None:
            continue
        nodes = [node]
        prev = _chain_arg(node, dependent)
        while prev is not None and _chain_arg(prev, dependent) is not None and real_users(prev) == [nodes[0]] \
                and prev not in seen:
            nodes.insert(0, prev)
            prev = _chain_arg(prev, dependent)
        while True:
            users = real_users(nodes[-1])
            if len(users) != 1 or _chain_arg(users[0], dependent) is not nodes[-1]:
                break
            nodes.append(users[0])
        seen.update(nodes)
        gemms = tuple(i for i, n in enumerate(nodes) if n.target in CHAIN_GEMM_OPS)
        if len(gemms) >= 2:
            chains.append(LinearChain(_chain_arg(nodes[0], dependent), tuple(nodes), gemms))
    return chains
