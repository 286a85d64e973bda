"""``premerge_ffn``: multiply structured factors back into one dense GEMM.

Rewrites every chain of ops that are affine in one input and contain two or
more constant-weight GEMMs with nothing nonlinear between them
(``structure.linear_chains``): low-rank adapters ``linear(linear(x, V), U, b)``,
the output of ``structure_ffn``, block-dense layers, and block-shuffle
(Monarch) layers written as reshape / transpose / bmm / einsum, into
``linear(x, W, b)`` (plus a view back to the chain's output shape), where the
context's cost model predicts the dense GEMM faster at the chain's token
count: the choice is per layer and per token count.

W and b come from pushing the identity through the traced subgraph, in
float64 with torch: row j of the probe batch is e_j, one extra row is 0, so
f(0) = b and f(e_j) − b is column j of W. That handles any permutation
between the factors (the shuffle of a Monarch layer): multiplying the block
matrices without it would be wrong. The traced shapes are kept: the probes are
fed in batches of the subgraph's own token count. A random-input check then
confirms that the subgraph is the token-wise affine map x ↦ xWᵀ + b (it
must not mix tokens); chains that fail are left alone with the reason. All of
this is evaluation of the existing ops (the plan), never a trial rewrite.

Preconditions: the chain's intermediate values are read only inside the
chain; its input and output agree on the number of token rows. A graph with
chains of which none is merged is not refused: the pass applies and reports
why each chain was left structured.

Exact: the merged GEMM computes the same affine map up to float
reassociation (W is computed in float64, then rounded once to the model's
dtype).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.fx.node import map_arg

from tfcompile import structure
from tfcompile.cost_models.ffn import linear_sketch
from tfcompile.graph import ModelGraph, fetch_attr
from tfcompile.passes.base import Exactness, PassRefused, PassResult, Stage, register_pass
from tfcompile.passes.context import PassContext

aten = torch.ops.aten

# fp64 evaluation of an affine map reproduces x ↦ xWᵀ + b to ~1e-15; anything
# above this means the subgraph is not that map (it mixes tokens or positions).
AFFINE_CHECK_TOL = 1e-9


@dataclasses.dataclass(frozen=True, eq=False)
class _Merge:
    """One chain to replace: ``nodes`` (read from ``entry``) become ``linear(entry, weight, bias)``."""

    name: str
    entry: torch.fx.Node
    nodes: tuple[torch.fx.Node, ...]
    weight: torch.Tensor
    bias: torch.Tensor | None  # None when the chain maps 0 to exactly 0


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    merges: tuple[_Merge, ...]
    left: tuple[str, ...]  # why each other chain stays structured


class _Region:
    """Evaluates ``nodes`` (a slice of a chain, read from ``entry``) in float64 on a given input."""

    def __init__(self, graph: ModelGraph, entry: torch.fx.Node, nodes: list[torch.fx.Node]):
        self.graph, self.entry, self.nodes = graph, entry, nodes
        self._consts: dict[torch.fx.Node, object] = {}
        self.dtype: torch.dtype | None = None  # of the model's weights: what the merged GEMM is stored in

    def _const(self, node: torch.fx.Node):
        if node not in self._consts:
            if node.op == "get_attr":
                value = fetch_attr(self.graph.gm, node.target)
            elif node.op == "call_function":
                value = node.target(*map_arg(node.args, self._const), **map_arg(node.kwargs, self._const))
            else:
                raise ValueError(f"{node.name} is not a constant")
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                if node.op == "get_attr" and self.dtype is None:
                    self.dtype = value.dtype
                value = value.double()
            self._consts[node] = value
        return self._consts[node]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.entry: x}
        look = lambda n: env[n] if n in env else self._const(n)  # noqa: E731
        with torch.no_grad():
            for node in self.nodes:
                if structure.is_passthrough(node):
                    env[node] = env[node.args[0]]  # skip casts that would leave float64
                else:
                    env[node] = node.target(*map_arg(node.args, look), **map_arg(node.kwargs, look))
        return env[self.nodes[-1]]


def _affine_map(region: _Region, in_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(W [out×in], b [out], relative error of the token-wise check), all float64."""
    tokens, d_in = math.prod(in_shape[:-1]), in_shape[-1]
    probes = torch.cat([torch.eye(d_in, dtype=torch.float64), torch.zeros(1, d_in, dtype=torch.float64)])
    pad = -len(probes) % tokens
    probes = torch.cat([probes, probes.new_zeros(pad, d_in)])
    rows = torch.cat([region(chunk.reshape(in_shape)).reshape(tokens, -1) for chunk in probes.split(tokens)])
    bias = rows[d_in]
    weight = (rows[:d_in] - bias).t().contiguous()
    x = torch.randn(in_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = region(x).reshape(tokens, -1)
    want = x.reshape(tokens, d_in) @ weight.t() + bias
    err = float((got - want).abs().max() / got.abs().max().clamp_min(1e-300))
    return weight, bias, err


def _candidates(chain: structure.LinearChain):
    """(entry, region) pairs, widest first; every region spans all the GEMMs of the chain.

    The widest region that passes also absorbs bias adds, scalings and the views
    around the GEMMs (GPT-2's [B·L, d] flattening) into the one merged linear."""
    first, last = chain.gemms[0], chain.gemms[-1]
    starts = [chain.entry] + list(chain.nodes[:first])
    for s in range(len(starts)):
        for e in range(len(chain.nodes) - 1, last - 1, -1):
            yield starts[s], list(chain.nodes[s:e + 1])


def _merge_for(graph: ModelGraph, chain: structure.LinearChain) -> _Merge | str:
    """The widest region of ``chain`` that is a token-wise affine map, or the reason there is none."""
    reason = "input and output do not have the same number of token rows"
    for entry, nodes in _candidates(chain):
        in_shape, out_shape = structure.shape_of(entry), structure.shape_of(nodes[-1])
        if not in_shape or not out_shape or math.prod(in_shape[:-1]) != math.prod(out_shape[:-1]):
            continue
        region = _Region(graph, entry, nodes)
        try:
            weight, bias, err = _affine_map(region, in_shape)
        except Exception as exc:  # an op that cannot run on the probes: leave the chain as it is
            reason = f"could not push the identity through it ({type(exc).__name__}: {exc})"
            continue
        if err <= AFFINE_CHECK_TOL:
            dtype = region.dtype or nodes[-1].meta["val"].dtype
            # A chain without any bias maps 0 to exactly 0 in fp64: keep it bias-free.
            kept_bias = bias.to(dtype) if bool(bias.abs().max() > 0) else None
            return _Merge(chain.name, entry, tuple(nodes), weight.to(dtype), kept_bias)
        reason = f"not a token-wise affine map (random-input check off by {err:.1e} relative)"
    return reason


def _dense_predicted_faster(merge: _Merge, context: PassContext) -> str | None:
    """None when the dense GEMM is predicted faster than the chain, else why the chain stays."""
    shape = structure.shape_of(merge.entry)
    dense = linear_sketch("dense", math.prod(shape[:-1]), shape[-1], merge.weight.shape[0],
                          bias=merge.bias is not None, dtype=merge.nodes[-1].meta["val"].dtype)
    dense_s = context.cost_model.predict(dense).latency_s
    structured_s = context.cost_model.predict(structure.sketch_of(merge.nodes)).latency_s
    if structured_s <= dense_s:
        return (f"{merge.name}: structured form predicted faster on {context.target} "
                f"({structured_s * 1e6:.1f} vs {dense_s * 1e6:.1f} us)")
    return None


def _plan(graph: ModelGraph, context: PassContext) -> _Plan:
    chains = structure.linear_chains(graph)
    if not chains:
        raise PassRefused("no chain of two or more linear maps without a nonlinearity between them: "
                          "nothing structured to merge")
    merges, left = [], []
    for chain in chains:
        merge = _merge_for(graph, chain)
        if isinstance(merge, str):
            left.append(f"{chain.name}: {merge}")
            continue
        slower = _dense_predicted_faster(merge, context)
        if slower is not None:
            left.append(slower)
            continue
        merges.append(merge)
    return _Plan(tuple(merges), tuple(left))


def _replace(graph: ModelGraph, merge: _Merge) -> None:
    gm = graph.gm
    entry, nodes = merge.entry, merge.nodes
    exit_ = nodes[-1]
    gemm = next(n for n in reversed(nodes) if n.target in structure.CHAIN_GEMM_OPS)
    base = f"premerged_{gemm.name}"
    stack = gemm.meta.get("nn_module_stack", {})
    with gm.graph.inserting_before(nodes[0]):
        build = structure.GraphBuilder(gm)
        weight = build.const(f"{base}_weight", merge.weight)
        bias = build.const(f"{base}_bias", merge.bias) if merge.bias is not None else None
        out = build(aten.linear.default, entry, weight, bias)
        out.meta["nn_module_stack"] = stack
        out_shape = structure.shape_of(exit_)
        if structure.shape_of(entry)[:-1] != out_shape[:-1]:
            out = build(aten.view.default, out, list(out_shape))
            out.meta["nn_module_stack"] = stack
    exit_.replace_all_uses_with(out)
    for node in reversed(nodes):
        for user in list(node.users):  # metadata asserts on the removed values
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)


@register_pass("premerge_ffn", Exactness.EXACT,
               "multiply structured factors (low-rank, block-dense, block-shuffle) back into one dense GEMM",
               plan=_plan, stage=Stage.FFN)
def premerge_ffn(graph: ModelGraph, plan: _Plan) -> PassResult:
    if not plan.merges:
        return PassResult(graph, False, "nothing merged: " + "; ".join(plan.left))
    attrs = {n.target for n in graph.nodes("get_attr")}
    for merge in plan.merges:
        _replace(graph, merge)
    structure.remove_dead_code(graph.gm, attrs)
    merged = [f"{m.name} ({sum(n.target in structure.CHAIN_GEMM_OPS for n in m.nodes)} GEMMs)"
              for m in plan.merges]
    summary = f"merged {len(merged)} structured layers into dense GEMMs: {', '.join(merged)}"
    if plan.left:
        summary += f"; left structured: {'; '.join(plan.left)}"
    return PassResult(graph, True, summary)
