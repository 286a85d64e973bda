"""Dense or structured: the predicted latency of one linear layer in each form.

A linear layer ``x·Wᵀ + b`` (in → out) can run as one dense GEMM or as a
structured factorisation with rank r: low-rank ``U(Vx)`` (two GEMMs,
r·(in+out) MACs per token) or block-dense ``U·blkdiag(V₁..V_k)x`` (a batched
GEMM over k blocks, then a dense one: in·r/k + r·out MACs). The structured
form does fewer FLOPs and reads fewer weight bytes but pays one more kernel
launch, so the dense form wins at few tokens on launch-bound devices and the
structured one at many tokens: a crossover in the token count T.

Each form is sketched by the very function ``structure_ffn`` writes it with
(``tfcompile.structure.emit_*``, here with sketch constants) and priced by a
``CostModel``, the one the variant search uses, so the choice and crossover
reported here are the ones the search sees when it compares a structured
variant with a dense one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from tfcompile import structure
from tfcompile.cost_models.model import CostModel

FORMS = ("lowrank", "blockdense")


def linear_sketch(form: str, tokens: int, d_in: int, d_out: int, *, rank: int = 0, blocks: int = 1,
                  bias: bool = True, dtype: torch.dtype = torch.float32) -> structure.GraphBuilder:
    """One in→out linear layer over ``tokens`` rows in ``form`` ("dense", "lowrank" or "blockdense")."""
    build = structure.GraphBuilder(dtype=dtype)
    x = build.input("x", (tokens, d_in))
    lead = (tokens,)
    if form == "dense":
        weight = build.sketch_const((d_out, d_in))
        structure.emit_dense_linear(build, x, weight, build.sketch_const((d_out,)) if bias else None,
                                    lead=lead, d_out=d_out)
    elif form == "lowrank":
        v, u = build.sketch_const((rank, d_in)), build.sketch_const((d_out, rank))
        structure.emit_lowrank_linear(build, x, v, u, build.sketch_const((d_out,)) if bias else None,
                                      lead=lead, d_out=d_out, rank=rank)
    elif form == "blockdense":
        v = build.sketch_const((blocks, d_in // blocks, rank // blocks))
        u = build.sketch_const((d_out, rank))
        structure.emit_blockdense_linear(build, x, v, u, build.sketch_const((d_out,)) if bias else None,
                                         lead=lead, d_in=d_in, d_out=d_out, rank=rank, blocks=blocks)
    else:
        raise ValueError(f"unknown linear form {form!r}; use dense, {', '.join(FORMS)}")
    return build


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


def _check_form(form: str, d_in: int, rank: int, blocks: int) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown structured form {form!r}; use one of {', '.join(FORMS)}")
    if form == "blockdense" and (d_in % blocks or rank % blocks):
        raise ValueError(f"block-dense needs in ({d_in}) and rank ({rank}) divisible by blocks ({blocks})")


def form_latencies_s(d_in: int, d_out: int, rank: int, tokens: int, cost_model: CostModel, *,
                     form: str = "lowrank", blocks: int = 4, bias: bool = True,
                     dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(dense, structured) predicted latency of one in→out linear layer at ``tokens`` rows."""
    _check_form(form, d_in, rank, blocks)
    dense = linear_sketch("dense", tokens, d_in, d_out, bias=bias, dtype=dtype)
    structured = linear_sketch(form, tokens, d_in, d_out, rank=rank, blocks=blocks, bias=bias, dtype=dtype)
    return cost_model.predict(dense).latency_s, cost_model.predict(structured).latency_s


def choose_form(d_in: int, d_out: int, rank: int, tokens: int, cost_model: CostModel, *,
                form: str = "lowrank", blocks: int = 4, bias: bool = True, dtype: torch.dtype = torch.float32,
                max_tokens: int = 1 << 16) -> FormChoice:
    """Predicted latency of one in→out linear layer, dense vs structured with ``rank``, at ``tokens`` rows."""
    def cost_at(t: int) -> tuple[float, float]:
        return form_latencies_s(d_in, d_out, rank, t, cost_model, form=form, blocks=blocks, bias=bias, dtype=dtype)

    dense_s, structured_s = cost_at(tokens)
    return FormChoice(tokens, dense_s, structured_s, crossover(cost_at, max_tokens))


def choose_ffn_form(d_model: int, d_hidden: int, rank: int, tokens: int, cost_model: CostModel, *,
                    gated: bool = False, form: str = "lowrank", blocks: int = 4, dtype: torch.dtype = torch.float32,
                    max_tokens: int = 1 << 16) -> FormChoice:
    """The same for a whole FFN block (up [and gate], down), every projection in the same form.

    The activation costs the same in both forms and is left out."""
    _check_form(form, d_model, rank, blocks)
    _check_form(form, d_hidden, rank, blocks)
    n_up = 2 if gated else 1

    def cost_at(t: int) -> tuple[float, float]:
        kw = dict(form=form, blocks=blocks, bias=True, dtype=dtype)
        up_dense, up_structured = form_latencies_s(d_model, d_hidden, rank, t, cost_model, **kw)
        down_dense, down_structured = form_latencies_s(d_hidden, d_model, rank, t, cost_model, **kw)
        return n_up * up_dense + down_dense, n_up * up_structured + down_structured

    dense_s, structured_s = cost_at(tokens)
    return FormChoice(tokens, dense_s, structured_s, crossover(cost_at, max_tokens))
