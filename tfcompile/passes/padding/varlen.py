"""``remove_padding_varlen``: run-time padding removal with one variable-length attention kernel per layer.

The rewrite is ``remove_padding_runtime``'s (valid tokens found from the
attention mask at run time, token-wise ops on the T packed tokens, scattered
back at the output), except for attention: each attention becomes one
``tfcompile::varlen_attention`` (``structure.varlen``) over the packed
tokens, with the sequences' offsets computed from the mask. That is Σ l²
scores in one kernel launch, where ``remove_padding`` launches an attention
(and its slices) per run of equal lengths, and ``remove_padding_runtime``
computes T² scores under a block-diagonal mask.

Preconditions: those of ``remove_padding_runtime`` (each refusal says why),
and a runtime with a variable-length attention kernel: torch on a GPU
(FlashAttention or memory-efficient varlen kernels). Other targets and
backends are refused with the reason: ONNX Runtime's CPU build has no packed
attention kernel and the variant's ONNX file computes the block-diagonal
form, so there ``remove_padding_runtime`` is the same model, priced honestly.

Exact: each query attends to exactly the keys of its own sequence (up to
itself when causal), as under the block-diagonal mask, where the other keys
had weight exp(−∞) = 0; only summation order changes. Grouped-query
attention's shared key and value heads are repeated to the query heads
first, which copies values.

Cost: the op's node carries the expected Σ l² of the workload's lengths
(``structure.varlen.SUM_SQ_LENGTHS``), which the cost model prices: the shapes only
show T.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from tfcompile.graph import ModelGraph
from tfcompile.passes.base import Exactness, PassRefused, PassResult, Stage, register_pass
from tfcompile.passes.context import PassContext
from tfcompile.passes.padding.runtime import RuntimePacker, RuntimePlan, describe, plan_runtime, rebuild
from tfcompile.passes.padding.token_rules import Rule, Step

# (device kind, backend) pairs that run tfcompile::varlen_attention as one kernel.
VARLEN_KERNELS = {("gpu", "torch")}


@dataclasses.dataclass(frozen=True)
class VarlenPadding:
    batch: int
    max_len: int
    expected_tokens: int
    expected_sum_sq_lengths: float
    source: str
    patterns: tuple[str, ...]


def check_varlen_kernel(context: PassContext, instead: str) -> None:
    """Refuse unless the context's target and backend run ``tfcompile::varlen_attention`` as one kernel."""
    device, backend = context.device, context.backend
    if (device.kind, backend) not in VARLEN_KERNELS:
        raise PassRefused(f"{backend} on a {device.kind} has no variable-length attention kernel "
                          f"(torch on a GPU has): {instead} serves here")


def _plan(graph: ModelGraph, context: PassContext) -> RuntimePlan:
    check_varlen_kernel(context, "remove_padding_runtime's block-diagonal attention")
    return plan_runtime(graph, context)


class VarlenPacker(RuntimePacker):
    """The run-time packer with each attention as one variable-length kernel (``Packer.varlen``)."""

    def __init__(self, graph: ModelGraph, plan: RuntimePlan):
        super().__init__(graph, plan)
        self.expected_sum_sq_lengths = plan.expected_sum_sq_lengths

    def attention(self, node: torch.fx.Node, step: Step) -> None:
        q, k, v = (self.get_packed(a).node for a in node.args[:3])  # [T, heads, dim]
        self.set_packed(node, self.varlen(node, q, k, v, self.tokens.patterns[node] == "causal"), step)

    def varlen_bounds(self) -> tuple[torch.fx.Node, int, float]:
        # Offsets from the mask at run time; every length up to the padded one may occur.
        return self.index("offsets"), self.geo.max_len, self.expected_sum_sq_lengths


VarlenPacker.emit = {**RuntimePacker.emit, Rule.ATTENTION: VarlenPacker.attention}


@register_pass("remove_padding_varlen", Exactness.EXACT,
               "compute only the valid tokens of any right-padded batch, found from the attention mask at run "
               "time, with one variable-length attention kernel per layer (GPU)",
               plan=_plan, stage=Stage.PADDING, runs_after=("remove_padding", "prepack", "remove_padding_runtime"))
def remove_padding_varlen(graph: ModelGraph, plan: RuntimePlan) -> PassResult:
    patterns = rebuild(graph, VarlenPacker(graph, plan))
    geo, sum_sq = plan.geometry, plan.expected_sum_sq_lengths
    return PassResult(graph, True, f"{describe(plan, f', Σl² {sum_sq:.0f}')}; "
                                   f"{len(patterns)} variable-length attention calls",
                      VarlenPadding(geo.batch, geo.max_len, geo.expected_tokens, sum_sq, plan.source, patterns))
