"""Norms written out as arithmetic (Llama's RMSNorm, hand-written LayerNorms)."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from tfcompile.graph import ModelGraph
from tfcompile.structure.shapes import dim_arg, is_scalar, shape_of
from tfcompile.structure.stream import is_passthrough, real_users

aten = torch.ops.aten


# ---------------------------------------------------------------------------
# Norms written out as arithmetic (Llama's RMSNorm, hand-written LayerNorms).

@dataclasses.dataclass(frozen=True)
class DecomposedNorm:
    """``x * rsqrt(mean(x²) + ε) [* w]`` (RMSNorm) or
    ``(x − μ) * rsqrt(mean((x − μ)²) + ε) [* w] [+ b]`` (LayerNorm) over the last axis."""

    kind: str  # "rms_norm" | "layer_norm"
    input: torch.fx.Node
    output: torch.fx.Node
    nodes: tuple[torch.fx.Node, ...]  # the subgraph that one fused node replaces
    dim: int
    eps: float
    weight: torch.fx.Node | None
    bias: torch.fx.Node | None


def _strip_passthrough(node):
    while isinstance(node, torch.fx.Node) and is_passthrough(node):
        node = node.args[0]
    return node


def _last_axis_mean_of(node) -> torch.fx.Node | None:
    """x when ``node`` is mean(x, -1, keepdim=True) over the last axis."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is aten.mean.dim):
        return None
    x, dims = node.args[0], node.args[1]
    keepdim = dim_arg(node, 2, "keepdim", False)
    ndim = len(shape_of(x) or ())
    if node.kwargs.get("dtype") is not None or not keepdim or list(dims) not in ([-1], [ndim - 1]):
        return None
    return x


def _square_of(node) -> torch.fx.Node | None:
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function"):
        return None
    if node.target is aten.pow.Tensor_Scalar and node.args[1] == 2:
        return node.args[0]
    if node.target is aten.mul.Tensor and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _same_value(a, b) -> bool:
    """a and b compute the same thing (one node, or two identical pure ops)."""
    a, b = _strip_passthrough(a), _strip_passthrough(b)
    if a is b:
        return True
    return (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a.op == b.op == "call_function"
            and a.target is b.target and a.target in (aten.sub.Tensor, aten.mean.dim)
            and all(_same_value(x, y) if isinstance(x, torch.fx.Node) else x == y for x, y in zip(a.args, b.args))
            and len(a.args) == len(b.args) and a.kwargs == b.kwargs)


def _centred_input(node) -> torch.fx.Node | None:
    """x when ``node`` is x − mean(x, -1, keepdim=True)."""
    node = _strip_passthrough(node)
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is aten.sub.Tensor):
        return None
    if node.kwargs.get("alpha", 1) != 1:
        return None
    x, m = node.args[0], node.args[1]
    mx = _last_axis_mean_of(_strip_passthrough(m))
    return _strip_passthrough(x) if mx is not None and _same_value(mx, x) else None


def _unique_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = real_users(node)
    return users[0] if len(users) == 1 else None


def _other_arg(node: torch.fx.Node, known) -> object:
    a, b = node.args[0], node.args[1]
    return b if _strip_passthrough(a) is _strip_passthrough(known) or a is known else a


def _vector_attr(value, d: int) -> bool:
    return isinstance(value, torch.fx.Node) and value.op == "get_attr" and shape_of(value) == (d,)


def _match_norm_at(r: torch.fx.Node) -> DecomposedNorm | None:
    """Match a norm around ``r`` = rsqrt(stat + ε) (or sqrt, used in a division)."""
    if r.target not in (aten.rsqrt.default, aten.sqrt.default):
        return None
    a = r.args[0]
    if not (isinstance(a, torch.fx.Node) and a.target is aten.add.Tensor):
        return None
    stat, eps = (a.args[0], a.args[1]) if is_scalar(a.args[1]) else (a.args[1], a.args[0])
    if not is_scalar(eps) or not isinstance(stat, torch.fx.Node):
        return None
    # The statistic: mean of a square (of x, or of x − μ), or var(x, correction=0).
    if stat.target in (aten.var.correction, aten.var.dim):
        x = _strip_passthrough(stat.args[0])
        ndim = len(shape_of(x) or ())
        if stat.target is aten.var.dim:  # var(x, dim, unbiased, keepdim)
            biased = dim_arg(stat, 2, "unbiased", True) is False
            keepdim = dim_arg(stat, 3, "keepdim", False)
        else:  # var(x, dim, *, correction, keepdim)
            biased = stat.kwargs.get("correction", 1) == 0
            keepdim = stat.kwargs.get("keepdim", False)
        if list(dim_arg(stat, 1, "dim", []) or []) not in ([-1], [ndim - 1]) or not biased or not keepdim:
            return None
        kind = "layer_norm"
    else:
        sq = _square_of(_last_axis_mean_of(stat))
        if sq is None:
            return None
        x = _centred_input(sq)
        kind = "layer_norm" if x is not None else "rms_norm"
        if x is None:
            x = _strip_passthrough(sq)
    # The normalisation: (x or x − μ) * rsqrt(...) or (x or x − μ) / sqrt(...).
    n = _unique_user(r)
    if n is None:
        return None
    if r.target is aten.rsqrt.default and n.target is aten.mul.Tensor:
        c = _other_arg(n, r)
    elif r.target is aten.sqrt.default and n.target is aten.div.Tensor and n.args[1] is r:
        c = n.args[0]
    else:
        return None
    if kind == "layer_norm":
        if _centred_input(c) is not x:
            return None
    elif _strip_passthrough(c) is not x:
        return None
    shape = shape_of(x)
    if not shape or shape_of(n) != shape:
        return None
    d = shape[-1]
    out, weight, bias = n, None, None
    nxt = _unique_user(out)
    while nxt is not None and is_passthrough(nxt):
        out, nxt = nxt, _unique_user(nxt)
    if nxt is not None and nxt.target is aten.mul.Tensor and _vector_attr(_other_arg(nxt, out), d):
        weight, out = _other_arg(nxt, out), nxt
        nxt = _unique_user(out)
    if kind == "layer_norm" and nxt is not None and nxt.target is aten.add.Tensor \
            and not nxt.kwargs and _vector_attr(_other_arg(nxt, out), d):
        bias, out = _other_arg(nxt, out), nxt
    # Collect the subgraph between x and out; none of it may be read from outside.
    inner: set[torch.fx.Node] = set()
    stack = [out]
    while stack:
        node = stack.pop()
        if node in inner or node is x or node.op != "call_function":
            continue
        inner.add(node)
        stack.extend(node.all_input_nodes)
    # Casts of x that are no-ops stay (others may read them); the fused node reads x.
    inner = {n for n in inner if not (is_passthrough(n) and _strip_passthrough(n) is x)}
    if any(u not in inner for node in inner if node is not out for u in real_users(node)):
        return None
    if any(t.op == "call_function" and t.target not in {
            aten.mean.dim, aten.sub.Tensor, aten.pow.Tensor_Scalar, aten.mul.Tensor, aten.add.Tensor,
            aten.rsqrt.default, aten.sqrt.default, aten.div.Tensor, aten.var.correction, aten.var.dim}
           and not is_passthrough(t)
           for t in inner):
        return None
    order = {node: i for i, node in enumerate(out.graph.nodes)}
    return DecomposedNorm(kind, x, out, tuple(sorted(inner, key=order.__getitem__)), d, float(eps), weight, bias)


def decomposed_norms(graph: ModelGraph) -> list[DecomposedNorm]:
    """Every RMSNorm / LayerNorm written out as arithmetic over the last axis."""
    found = []
    for node in graph.call_nodes():
        match = _match_norm_at(node)
        if match is not None:
            found.append(match)
    return found
