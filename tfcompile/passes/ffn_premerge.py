"""``premerge_ffn``: multiply structured factors back into one dense GEMM.

Rewrites every chain of ops that are affine in one input and contain two or
more constant-weight GEMMs with nothing nonlinear between them
(``structure.linear_chains``): low-rank adapters ``linear(linear(x, V), U, b)``,
the output of ``structure_ffn``, block-dense layers, and block-shuffle
(Monarch) layers written as reshape / transpose / bmm / einsum, into
``linear(x, W, b)`` (plus a view back to the chain's output shape).

W and b come from pushing the identity through the traced subgraph, in
float64 with torch: row j of the probe batch is e_j, one extra row is 0, so
f(0) = b and f(e_j) − b is column j of W. That handles any permutation
between the factors (the shuffle of a Monarch layer): multiplying the block
matrices without it would be wrong. The traced shapes are kept: the probes are
fed in batches of the subgraph's own token count. A random-input check then
confirms that the subgraph is the token-wise affine map x ↦ xWᵀ + b (it
must not mix tokens); chains that fail are left alone with the reason.

Preconditions: the chain's intermediate values are read only inside the
chain; its input and output agree on the number of token rows.

Exact: the merged GEMM computes the same affine map up to float
reassociation (W is computed in float64, then rounded once to the model's
dtype). With ``device`` (a target name) a chain is merged only where that
target's cost model predicts the dense GEMM faster at the chain's token count,
which makes the choice per layer and per token count.
"""

from __future__ import annotations

import math

import torch
from torch.fx.node import map_arg

from tfcompile.cost_models.calibration import load_profile
from tfcompile.cost_models.ffn import NodeSet, dense_linear, predict_s
from tfcompile.graph import ModelGraph, fetch_attr
from tfcompile import structure
from tfcompile.passes.base import Exactness, PassResult, Stage, register_checked_pass

aten = torch.ops.aten

# fp64 evaluation of an affine map reproduces x ↦ xWᵀ + b to ~1e-15; anything
# above this means the subgraph is not that map (it mixes tokens or positions).
AFFINE_CHECK_TOL = 1e-9


def _check(graph: ModelGraph) -> str | None:
    if structure.linear_chains(graph):
        return None
    return "no chain of two or more linear maps without a nonlinearity between them: nothing structured to merge"


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("val")
    return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else None


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


def _merge_plan(graph: ModelGraph, chain: structure.LinearChain):
    """(entry, region, W, b) for the widest region that is a token-wise affine map, or the reason."""
    reason = "input and output do not have the same number of token rows"
    for entry, nodes in _candidates(chain):
        in_shape, out_shape = _shape(entry), _shape(nodes[-1])
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
            return entry, nodes, weight.to(dtype), bias.to(dtype)
        reason = f"not a token-wise affine map (random-input check off by {err:.1e} relative)"
    return reason


def _replace(graph: ModelGraph, entry, nodes, weight, bias) -> None:
    gm = graph.gm
    exit_ = nodes[-1]
    gemm = next(n for n in reversed(nodes) if n.target in structure.CHAIN_GEMM_OPS)
    base = f"premerged_{gemm.name}"
    with gm.graph.inserting_before(nodes[0]):
        w = gm.graph.get_attr(structure.add_constant(gm, f"{base}_weight", weight))
        # A chain without any bias maps 0 to exactly 0 in fp64: keep it bias-free.
        b = gm.graph.get_attr(structure.add_constant(gm, f"{base}_bias", bias)) \
            if bool(bias.abs().max() > 0) else None
        out = gm.graph.call_function(aten.linear.default, (entry, w, b))
        out.meta["nn_module_stack"] = gemm.meta.get("nn_module_stack", {})
        if _shape(entry)[:-1] != _shape(exit_)[:-1]:
            out = gm.graph.call_function(aten.view.default, (out, list(_shape(exit_))))
            out.meta["nn_module_stack"] = gemm.meta.get("nn_module_stack", {})
    exit_.replace_all_uses_with(out)
    for node in reversed(nodes):
        for user in list(node.users):  # metadata asserts on the removed values
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)


@register_checked_pass("premerge_ffn", Exactness.EXACT,
               "multiply structured factors (low-rank, block-dense, block-shuffle) back into one dense GEMM", _check, stage=Stage.FFN)
def premerge_ffn(graph: ModelGraph, *, device: str | None = None, backend: str | None = None) -> PassResult:
    profile = load_profile(device, backend) if device and backend else None
    merged, left = [], []
    chains = structure.linear_chains(graph)
    attrs = {n.target for n in graph.nodes("get_attr")}
    for chain in chains:
        plan = _merge_plan(graph, chain)
        if isinstance(plan, str):
            left.append(f"{chain.name}: {plan}")
            continue
        entry, nodes, weight, bias = plan
        if device is not None:
            shape = _shape(entry)
            dense_s = predict_s(dense_linear(math.prod(shape[:-1]), shape[-1], weight.shape[0],
                                             bias=bool(bias.abs().max() > 0), dtype=nodes[-1].meta["val"].dtype),
                                device, profile)
            structured_s = predict_s(NodeSet(nodes), device, profile)
            if structured_s <= dense_s:
                left.append(f"{chain.name}: structured form predicted faster on {device} "
                            f"({structured_s * 1e6:.1f} vs {dense_s * 1e6:.1f} us)")
                continue
        _replace(graph, entry, nodes, weight, bias)
        merged.append(f"{chain.name} ({sum(n.target in structure.CHAIN_GEMM_OPS for n in nodes)} GEMMs)")
    if not merged:
        return PassResult(graph, False, "nothing merged: " + "; ".join(left))
    structure.remove_dead_code(graph.gm, attrs)
    summary = f"merged {len(merged)} structured layers into dense GEMMs: {', '.join(merged)}"
    if left:
        summary += f"; left structured: {'; '.join(left)}"
    return PassResult(graph, True, summary)
