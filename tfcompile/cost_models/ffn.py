"""Dense or structured: the predicted latency of one linear layer in each form.

A linear layer ``x·Wᵀ + b`` (in → out) can run as one dense GEMM or as a
structured factorisation with rank r: low-rank ``U(Vx)`` (two GEMMs,
r·(in+out) MACs per token) or block-dense ``U·blkdiag(V₁..V_k)x`` (a batched
GEMM over k blocks, then a dense one: in·r/k + r·out MACs). The structured
form does fewer FLOPs and reads fewer weight bytes but pays one more kernel
launch, so the dense form wins at few tokens on launch-bound devices and the
structured one at many tokens: a crossover in the token count T.

Both forms are written as tiny fx graphs over meta-device tensors and costed
by the functions the variant search itself uses (``roofline.estimate``, or a
calibration ``Profile``), so the choice and crossover reported here are the
ones the search sees when it compares a structured variant with a dense one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx

from tfcompile.cost_models.calibration import Profile
from tfcompile.cost_models.device import DeviceSpec, load_device
from tfcompile.cost_models.roofline import estimate

aten = torch.ops.aten

FORMS = ("lowrank", "blockdense")


class NodeSet:
    """A stand-in for a ModelGraph holding just some nodes: the estimators read only ``call_nodes()``."""

    def __init__(self, nodes):
        self._nodes = list(nodes)

    def call_nodes(self) -> list[torch.fx.Node]:
        return [n for n in self._nodes if n.op == "call_function"]


class _Builder:
    """An fx graph whose nodes carry meta-device values: shapes and dtypes, no memory."""

    def __init__(self, dtype: torch.dtype):
        self.graph = torch.fx.Graph()
        self.dtype = dtype
        self._count = 0

    def _meta(self, node: torch.fx.Node, shape) -> torch.fx.Node:
        node.meta["val"] = torch.empty(tuple(shape), dtype=self.dtype, device="meta")
        return node

    def input(self, shape) -> torch.fx.Node:
        return self._meta(self.graph.placeholder("x"), shape)

    def const(self, shape) -> torch.fx.Node:
        self._count += 1
        return self._meta(self.graph.get_attr(f"c{self._count}"), shape)

    def op(self, target, args, shape) -> torch.fx.Node:
        return self._meta(self.graph.call_function(target, tuple(args)), shape)

    def nodes(self) -> NodeSet:
        return NodeSet(self.graph.nodes)


def dense_linear(tokens: int, d_in: int, d_out: int, *, bias: bool = True,
                 dtype: torch.dtype = torch.float32) -> NodeSet:
    g = _Builder(dtype)
    x = g.input((tokens, d_in))
    g.op(aten.linear.default, (x, g.const((d_out, d_in)), g.const((d_out,)) if bias else None), (tokens, d_out))
    return g.nodes()


def lowrank_linear(tokens: int, d_in: int, d_out: int, rank: int, *, bias: bool = True,
                   dtype: torch.dtype = torch.float32) -> NodeSet:
    """``linear(linear(x, V), U, b)``: the form ``structure_ffn`` writes."""
    g = _Builder(dtype)
    x = g.input((tokens, d_in))
    h = g.op(aten.linear.default, (x, g.const((rank, d_in)), None), (tokens, rank))
    g.op(aten.linear.default, (h, g.const((d_out, rank)), g.const((d_out,)) if bias else None), (tokens, d_out))
    return g.nodes()


def blockdense_linear(tokens: int, d_in: int, d_out: int, rank: int, blocks: int, *, bias: bool = True,
                      dtype: torch.dtype = torch.float32) -> NodeSet:
    """view → transpose → bmm(k blocks) → transpose → view → linear: the form ``structure_ffn`` writes."""
    k, p, q = blocks, d_in // blocks, rank // blocks
    g = _Builder(dtype)
    x = g.input((tokens, d_in))
    xb = g.op(aten.transpose.int, (g.op(aten.view.default, (x, [tokens, k, p]), (tokens, k, p)), 0, 1),
              (k, tokens, p))
    hb = g.op(aten.bmm.default, (xb, g.const((k, p, q))), (k, tokens, q))
    h = g.op(aten.view.default, (g.op(aten.transpose.int, (hb, 0, 1), (tokens, k, q)), [tokens, rank]),
             (tokens, rank))
    g.op(aten.linear.default, (h, g.const((d_out, rank)), g.const((d_out,)) if bias else None), (tokens, d_out))
    return g.nodes()


def predict_s(graph, device: str | DeviceSpec, profile: Profile | None = None) -> float:
    """Predicted latency of ``graph`` (a ModelGraph or NodeSet): calibrated when a profile is given."""
    if profile is not None:
        return profile.predict_s(graph)
    return estimate(graph, load_device(device) if isinstance(device, str) else device).latency_s


@dataclasses.dataclass(frozen=True)
class FormChoice:
    tokens: int
    dense_s: float
    structured_s: float
    # Smallest token count at which the structured form is predicted faster
    # (1 if it always is), None if it never is up to the search limit.
    crossover_tokens: int | None

    @property
    def best(self) -> str:
        return "structured" if self.structured_s < self.dense_s else "dense"

    @property
    def speedup(self) -> float:
        """Predicted dense / structured latency (> 1: structured is faster)."""
        return self.dense_s / self.structured_s


def crossover(cost_at: Callable[[int], tuple[float, float]], max_tokens: int = 1 << 16) -> int | None:
    """Smallest T with structured < dense, given ``cost_at(T) -> (dense_s, structured_s)``.

    Scans powers of two, then bisects the first interval where the order
    flips; assumes one crossing, which holds for max(compute, memory) + launch
    costs that both grow linearly in T."""
    def faster(tokens: int) -> bool:
        dense_s, structured_s = cost_at(tokens)
        return structured_s < dense_s

    lo, hi = 0, 1
    while hi <= max_tokens and not faster(hi):
        lo, hi = hi, hi * 2
    if hi > max_tokens:
        return None
    while hi - lo > 1:  # dense wins at lo (or lo = 0), structured at hi
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if faster(mid) else (mid, hi)
    return hi


def _linear_cost(d_in, d_out, rank, device, *, form, blocks, bias, dtype, profile):
    def cost_at(tokens: int) -> tuple[float, float]:
        dense = dense_linear(tokens, d_in, d_out, bias=bias, dtype=dtype)
        if form == "blockdense":
            structured = blockdense_linear(tokens, d_in, d_out, rank, blocks, bias=bias, dtype=dtype)
        else:
            structured = lowrank_linear(tokens, d_in, d_out, rank, bias=bias, dtype=dtype)
        return predict_s(dense, device, profile), predict_s(structured, device, profile)
    return cost_at


def _check_form(form: str, d_in: int, rank: int, blocks: int) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown structured form {form!r}; use one of {', '.join(FORMS)}")
    if form == "blockdense" and (d_in % blocks or rank % blocks):
        raise ValueError(f"block-dense needs in ({d_in}) and rank ({rank}) divisible by blocks ({blocks})")


def choose_form(d_in: int, d_out: int, rank: int, tokens: int, device: str | DeviceSpec = "cpu", *,
                form: str = "lowrank", blocks: int = 4, bias: bool = True, dtype: torch.dtype = torch.float32,
                profile: Profile | None = None, max_tokens: int = 1 << 16) -> FormChoice:
    """Predicted latency of one in→out linear layer, dense vs structured with ``rank``, at ``tokens`` rows."""
    _check_form(form, d_in, rank, blocks)
    cost_at = _linear_cost(d_in, d_out, rank, device, form=form, blocks=blocks, bias=bias, dtype=dtype,
                           profile=profile)
    dense_s, structured_s = cost_at(tokens)
    return FormChoice(tokens, dense_s, structured_s, crossover(cost_at, max_tokens))


def choose_ffn_form(d_model: int, d_hidden: int, rank: int, tokens: int, device: str | DeviceSpec = "cpu", *,
                    gated: bool = False, form: str = "lowrank", blocks: int = 4, dtype: torch.dtype = torch.float32,
                    profile: Profile | None = None, max_tokens: int = 1 << 16) -> FormChoice:
    """The same for a whole FFN block (up [and gate], down), every projection in the same form.

    The activation costs the same in both forms and is left out."""
    _check_form(form, d_model, rank, blocks)
    _check_form(form, d_hidden, rank, blocks)
    kw = dict(form=form, blocks=blocks, bias=True, dtype=dtype, profile=profile)
    up = _linear_cost(d_model, d_hidden, rank, device, **kw)
    down = _linear_cost(d_hidden, d_model, rank, device, **kw)

    def cost_at(t: int) -> tuple[float, float]:
        (ud, us), (dd, ds) = up(t), down(t)
        n_up = 2 if gated else 1
        return n_up * ud + dd, n_up * us + ds

    dense_s, structured_s = cost_at(tokens)
    return FormChoice(tokens, dense_s, structured_s, crossover(cost_at, max_tokens))
