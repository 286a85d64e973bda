"""``remove_padding`` (ByteTransformer): compute only the T = Σ l_b valid tokens of a right-padded [B, L] batch.

- the token inputs are gathered to [T] with a constant index built from the
  prefix sum of the lengths (sequences ordered longest first);
- every token-wise op (embeddings, linears, norms, activations, residual adds)
  runs on [T, ...]; position and token-type embeddings are gathered at each
  token's own (b, j), so positions restart at 0 for every sequence;
- attention runs per sequence: one SDPA per run of equal-length sequences on
  [n, heads, l, dim] slices, never a masked T×T product, so attention costs
  Σ l_b² instead of B·L²; with ``attention="varlen"``, one
  ``tfcompile::varlen_attention`` per layer over all packed tokens instead
  (same Σ l_b² work, one kernel launch where the loop launches one per length:
  on a GPU the loop is launch-bound), only where the runtime has that kernel
  (torch on a GPU; refused elsewhere with the reason);
- a mask-weighted sum over the sequence (sentence-embedding mean pooling, as in
  minilm) becomes a sum over each sequence's own tokens, and selecting one
  position (CLS pooling) reads it from the packed tokens;
- outputs still indexed by token are scattered back to [B, L, ...] with zeros
  at padded positions, so the variant keeps the original signature;
- the gathers are constants for these lengths, so the floating outputs are
  made NaN when a mask input shows other valid tokens (``packer.guard_traced_lengths``):
  the variant refuses, loudly, batches it was not built for.

Preconditions: those of the package (an integer [B, L] token input, right
padding, no op but attention mixing tokens, self-attention masks that keep
each sequence to itself; see ``batch.py`` and ``token_rules.py``), and some
padding: lengths from ``context.workload`` or the example attention mask.

Exact: a valid token's output depends only on its own values through
token-wise ops, and on its own sequence's valid keys in attention, where
padded keys had weight exp(−∞) = 0 in the padded model; pooled sums dropped
exact zeros. Only the summation order of reductions (GEMM blocking, softmax
over l instead of L keys) changes. Outputs at padded positions are zeros
instead of the padded model's values, which were meaningless.
"""

from __future__ import annotations

import dataclasses

from tfcompile.graph import ModelGraph
from tfcompile.passes.base import Exactness, PassRefused, PassResult, Stage, register_pass
from tfcompile.passes.context import PassContext
from tfcompile.passes.padding.batch import read_padded_batch
from tfcompile.passes.padding.geometry import packed_geometry
from tfcompile.passes.padding.packer import PackingPlan, pack
from tfcompile.passes.padding.token_rules import plan_tokens
from tfcompile.passes.padding.varlen import check_varlen_kernel


@dataclasses.dataclass(frozen=True)
class RemovedPadding:
    lengths: tuple[int, ...]
    tokens: int  # Σ l_b, the packed token axis


ATTENTION_FORMS = ("per_length", "varlen")


def _plan(graph: ModelGraph, context: PassContext, attention: str = "per_length") -> PackingPlan:
    if attention not in ATTENTION_FORMS:
        raise PassRefused(f"attention={attention!r} is not one of {', '.join(ATTENTION_FORMS)}")
    if attention == "varlen":
        check_varlen_kernel(context, "remove_padding's per-length attention")
    batch = read_padded_batch(graph, context.workload)
    if batch.tokens == batch.batch * batch.max_len:
        raise PassRefused(f"no padding: every row has the full length {batch.max_len} "
                          "(give the workload's lengths or a padded attention mask)")
    geometry = packed_geometry(list(batch.lengths), batch.max_len)
    return PackingPlan(batch, geometry, plan_tokens(graph, geometry, batch), varlen_attention=attention == "varlen")


@register_pass("remove_padding", Exactness.EXACT,
               "compute only the valid tokens of a right-padded batch: packed token-wise ops, "
               "per-sequence attention, scatter back at the output", plan=_plan, stage=Stage.PADDING,
               lengths_specific=True)
def remove_padding(graph: ModelGraph, plan: PackingPlan) -> PassResult:
    pack(graph, plan)
    layers = len(plan.tokens.patterns)
    attention = (f"{layers} variable-length attention calls" if plan.varlen_attention else
                 f"{plan.tokens.attention_calls} attention calls over {len(plan.geometry.groups)} length groups")
    return PassResult(graph, True, f"packed {plan.batch.describe()}; {attention}",
                      RemovedPadding(plan.batch.lengths, plan.geometry.tokens))
