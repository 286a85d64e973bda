"""``prepack`` (Prepacking, decoder prefill): bin-pack a right-padded batch's sequences into dense rows.

The sequences go first-fit decreasing into rows of ``capacity`` tokens (the
knob; default: the longest sequence), and the model runs dense rows
[rows, capacity] with a block-diagonal (causal) attention mask; positions
restart per sequence, as in remove_padding. Attention costs rows·capacity²
instead of B·L², which pays when many short prompts share a row. Unused slots
of a row attend to themselves only, so no query row is empty.

Preconditions: those of the package (an integer [B, L] token input, right
padding, no op but attention mixing tokens, self-attention masks that keep
each sequence to itself; see ``batch.py`` and ``token_rules.py``); no pooling
over the sequence (a binned row holds several sequences); fewer slots than
the padded batch. A capacity below the longest sequence is a ``ShapeError``.

Exact for the same reason as remove_padding: the block-diagonal mask gives
every other slot weight exp(−∞) = 0, so a valid token sees exactly its own
sequence's keys; only summation order changes.
"""

from __future__ import annotations

import dataclasses

from tfcompile.errors import ShapeError
from tfcompile.graph import ModelGraph
from tfcompile.passes.base import Exactness, PassRefused, PassResult, Stage, register_pass
from tfcompile.passes.context import PassContext
from tfcompile.passes.padding.batch import read_padded_batch
from tfcompile.passes.padding.geometry import binned_geometry
from tfcompile.passes.padding.packer import PackingPlan, pack
from tfcompile.passes.padding.token_rules import plan_tokens


@dataclasses.dataclass(frozen=True)
class Prepacked:
    lengths: tuple[int, ...]
    rows: int
    capacity: int  # token slots per row


def _plan(graph: ModelGraph, context: PassContext, capacity: int | None = None) -> PackingPlan:
    batch = read_padded_batch(graph, context.workload)
    longest = max(batch.lengths)
    capacity = longest if capacity is None else int(capacity)
    if capacity < longest:
        raise ShapeError(f"bin capacity {capacity} is shorter than the longest sequence ({longest})")
    geometry = binned_geometry(list(batch.lengths), batch.max_len, capacity)
    if geometry.slots >= batch.batch * batch.max_len:
        raise PassRefused(f"no gain: {batch.batch} sequences need {geometry.tok_dims[0]} rows of "
                          f"{capacity} slots, no fewer than the padded batch")
    return PackingPlan(batch, geometry, plan_tokens(graph, geometry, batch))


@register_pass("prepack", Exactness.EXACT,
               "bin-pack the sequences of a right-padded batch into dense rows with block-diagonal "
               "attention masks and per-sequence positions (prefill)", plan=_plan, stage=Stage.PADDING,
               runs_after=("remove_padding",), lengths_specific=True)
def prepack(graph: ModelGraph, plan: PackingPlan) -> PassResult:
    pack(graph, plan)
    rows, capacity = plan.geometry.tok_dims
    return PassResult(graph, True, f"prepacked {plan.batch.describe()} into {rows} rows of {capacity}; "
                                   f"{plan.tokens.attention_calls} block-diagonal attention calls",
                      Prepacked(plan.batch.lengths, rows, capacity))
