"""``remove_padding_runtime``: padding removal whose valid tokens are read from the attention mask at run time.

``remove_padding`` bakes one batch's lengths into the graph (constant gather
indices, one SDPA per run of equal lengths); fed other lengths, it returns
wrong rows. This form serves any right-padded batch of the traced [B, L]:

- ``valid = attention_mask != 0``; the flat positions of the valid tokens
  (``nonzero``, T of them, known only at run time) gather every token input
  to [T, ...], and their row (``// L``) and column (``% L``) gather position
  and token-type embeddings, so positions restart at 0 for every sequence;
- every token-wise op (embeddings, linears, norms, activations, residual adds)
  runs on [T, ...], with the rules ``remove_padding`` uses (``token_rules``);
- each attention is one SDPA over the T packed tokens with a block-diagonal
  [T, T] boolean mask: token i may see token j when both belong to the same
  sequence (and, for a causal model, j comes no later than i). That costs T²
  scores instead of B·L²;
- a mask-weighted sum over the sequence (mean pooling) is a [B, T] one-hot
  product with the packed tokens, and CLS selection reads each sequence's
  first packed token;
- outputs indexed by token are scattered back to [B, L, ...] with zeros at
  padded positions (an index computed from the cumulative sum of ``valid``).

Preconditions (each refusal says why): those of the package (an integer
[B, L] token input, a right-padded 0/1 example mask, no op but attention
mixing tokens; ``batch.py``, ``token_rules.py``); exactly one mask input,
from which the valid tokens are read; every attention keeps each sequence to
itself, fully or causally, with the same pattern for every probe batch of
lengths (the example's, all full, all one token, a staircase), which is how
a mask computed from the input rather than fixed at trace time is detected;
selecting a position other than the first refused (it may be padding at run
time); lengths to price (below). Models without a mask input
(GPT-2 here) are refused: ``remove_padding`` with given lengths serves them.

Exact: a valid token's output depends on its own values through token-wise
ops, and in attention on the keys its padded model let it see, which the
block mask selects (other keys get exp(−∞) = 0, as padded keys did in the
padded model); pooled sums drop exact zeros. Only summation order changes.
Outputs at padded positions are zeros instead of the padded model's
meaningless values. A run-time row with no valid token has no meaningful
output in either model.

Cost: the cost model prices shapes, so the packed axis carries the expected
token count: the workload's mean length times B (``context.workload.lengths``,
any number of samples) or else the example mask's count (refused when that
mask has no padding and no lengths are given); the record keeps it. A dense
batch is priced too: there one product over T = B·L tokens costs B times the
padded attention, so the form pays only when enough padding is removed.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

from tfcompile import structure
from tfcompile.errors import ShapeError
from tfcompile.graph import ModelGraph
from tfcompile.passes.base import Exactness, PassRefused, PassResult, Stage, register_pass
from tfcompile.passes.context import PassContext, Workload
from tfcompile.passes.padding.batch import PaddedBatch, read_padded_batch
from tfcompile.passes.padding.geometry import with_lengths
from tfcompile.passes.padding.layout import REDUCTIONS
from tfcompile.passes.padding.packer import Packer
from tfcompile.passes.padding.token_rules import Rule, Step, TokenPlan, plan_tokens

aten = torch.ops.aten


def valid_token_index(valid: torch.Tensor, expected: int) -> torch.Tensor:
    """The flat positions of the valid tokens of a flattened [B·L] boolean mask: [T], T known at run time.

    A graph node of its own so that each reader gets the size it can use:
    running and exporting (``torch.export`` traces ``nonzero`` with a
    data-dependent size) get the real count; shape propagation without
    symbolic sizes (``graph.refresh_shapes``, whose shapes the cost model
    prices) gets ``expected``, the workload's token count."""
    if isinstance(valid, FakeTensor) and valid.fake_mode.shape_env is None:
        return valid.new_empty((expected,), dtype=torch.int64)
    index = torch.nonzero(valid).squeeze(1)
    torch._check(index.shape[0] >= 1)  # every row holds a token, so the batch does
    torch._check(index.shape[0] <= valid.shape[0])
    return index


@dataclasses.dataclass(frozen=True)
class RuntimeGeometry:
    """The packed token axis of the run-time form: one [T] axis whose size only the run knows.

    Read by the token rules and the packer where ``Geometry`` would be: the
    packed axis is -1 in every reshape, and the shortest row that may occur
    has one token."""

    batch: int
    max_len: int
    expected_tokens: int  # what the cost model sees as T
    tok_dims: tuple[int, ...] = (-1,)
    binned: bool = False
    calls_per_attention: int = 1

    @property
    def slots(self) -> int:
        return -1

    @property
    def lengths(self) -> tuple[int, ...]:
        return (1,) * self.batch


@dataclasses.dataclass(frozen=True)
class RuntimePlan:
    batch: PaddedBatch
    geometry: RuntimeGeometry
    tokens: TokenPlan
    mask: torch.fx.Node
    source: str  # where the expected token count came from
    expected_sum_sq_lengths: float  # Σ l² over the batch, which variable-length attention's work follows


@dataclasses.dataclass(frozen=True)
class RuntimePadding:
    batch: int
    max_len: int
    expected_tokens: int  # the packed token count the cost model priced
    source: str  # "workload" or "example mask"
    patterns: tuple[str, ...]  # per attention: "full" or "causal" within a sequence


def _run_time_patterns(graph: ModelGraph, example: PaddedBatch) -> dict[torch.fx.Node, str]:
    """Each attention's pattern within a sequence, the same for every probe batch, or a refusal.

    The pattern comes from full rows (which tell full from causal); the
    example's lengths, one-token rows and a staircase of lengths must give the
    same pattern where a row is long enough to tell, and every probe must keep
    valid tokens off padded keys: a mask fixed at trace time, or not read at
    all, fails one of them."""
    batch, seq = example.batch, example.max_len
    full = read_padded_batch(with_lengths(graph, [seq] * batch), Workload()).patterns
    staircase = [max(1, seq - (b * seq) // batch) for b in range(batch)]
    for lengths in (list(example.lengths), [1] * batch, staircase):
        probe = read_padded_batch(with_lengths(graph, lengths), Workload()).patterns
        changed = next((n for n, p in probe.items() if full[n] != p), None)
        if changed is not None and max(lengths) > 1:
            raise PassRefused(f"{changed.name}: the attention pattern changes with the lengths "
                              f"({full[changed]} for full rows, {probe[changed]} for lengths {lengths})")
    return full


def plan_runtime(graph: ModelGraph, context: PassContext) -> RuntimePlan:
    """The run-time packing plan of ``graph`` for ``context``'s workload, or a refusal saying why."""
    if any(n.target is valid_token_index for n in graph.call_nodes()) or any(
            n.target.startswith("packing_") for n in graph.nodes("get_attr")):
        raise PassRefused("the padding is already removed (remove_padding or prepack ran before)")
    example = read_padded_batch(graph, Workload())
    seq = example.inputs
    if len(seq.masks) != 1:
        raise PassRefused("no attention mask input: the valid tokens are read from it at run time "
                          "(remove_padding, specialised to given lengths, serves models without one)"
                          if not seq.masks else
                          f"{len(seq.masks)} mask inputs: which one decides the valid tokens at run time is unknown")
    example = dataclasses.replace(example, patterns=_run_time_patterns(graph, example))
    lengths, source = _priced_lengths(example, context)
    expected = max(example.batch, round(example.batch * sum(lengths) / len(lengths)))
    if source == "example mask" and expected == seq.batch * seq.seq:
        # Nothing says what to price. Given lengths are priced even when dense: there the packed
        # attention (T² = (B·L)² scores) costs more than the padded one, which the search should see.
        raise PassRefused(f"no padding to price: every row of the example mask has the full length {seq.seq} "
                          "and the workload gives no lengths")
    geometry = RuntimeGeometry(seq.batch, seq.seq, expected)
    sum_sq = example.batch * sum(n * n for n in lengths) / len(lengths)
    return RuntimePlan(example, geometry, plan_tokens(graph, geometry, example), seq.masks[0], source, sum_sq)


def _priced_lengths(example: PaddedBatch, context: PassContext) -> tuple[list[int], str]:
    """The lengths to price: the workload's (any number of samples), else the example mask's."""
    lengths = context.workload.lengths
    if lengths is None:
        return list(example.lengths), "example mask"
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise ShapeError("the workload's lengths are empty")
    for i, length in enumerate(lengths):
        if not 1 <= length <= example.max_len:
            raise ShapeError(f"workload length {i} is {length}, outside 1..{example.max_len} "
                             f"(the padded length)")
    return lengths, "workload"


class RuntimePacker(Packer):
    """The packer with the token indices computed from the mask input instead of baked in."""

    def __init__(self, graph: ModelGraph, plan: RuntimePlan):
        super().__init__(graph, plan.geometry, plan.tokens)
        self.mask = plan.mask
        self.indices: dict[str, torch.fx.Node] = {}

    def index(self, key: str) -> torch.fx.Node:
        """One of the run-time index tensors, built once from the mask on first use."""
        if not self.indices:
            cur, self.cur = self.cur, None  # shared by every layer: no module stack of its own
            self._build_index()
            self.cur = cur
        return self.indices[key]

    def _build_index(self) -> None:
        batch, max_len = self.geo.batch, self.geo.max_len
        mask = self.plain[self.mask]
        valid = self.call(aten.ne.Scalar, (mask, 0))  # [B, L] bool
        flat = self.call(aten.reshape.default, (valid, [batch * max_len]))
        gather = self.call(valid_token_index, (flat, self.geo.expected_tokens))  # [T]
        row = self.call(aten.div.Scalar_mode, (gather, max_len), {"rounding_mode": "floor"})
        column = self.call(aten.sub.Tensor, (gather, self.call(aten.mul.Tensor, (row, max_len))))
        # Padded position p -> its packed slot, or T (the zero row unpack appends) when p is padding.
        counts = self.call(aten.cumsum.default, (flat, 0), {"dtype": torch.int64})
        total = self.call(aten.sum.dim_IntList, (flat, [0]), {"dtype": torch.int64})
        slot = self.call(aten.sub.Tensor, (counts, 1))
        scatter = self.call(aten.where.self, (flat, slot, total))
        lengths = self.call(aten.sum.dim_IntList, (valid, [1]), {"dtype": torch.int64})
        ends = self.call(aten.cumsum.default, (lengths, 0))
        starts = self.call(aten.sub.Tensor, (ends, lengths))
        zero = self.call(aten.zeros.default, ([1],), {"dtype": torch.int64})
        offsets = self.call(aten.cat.default, ([zero, ends],))  # [B + 1]: sequence b is offsets[b]:offsets[b + 1]
        self.indices.update(gather_index=gather, slot_batch=row, slot_position=column, scatter_index=scatter,
                            starts=starts, offsets=offsets)

    def block_mask(self, causal: bool) -> torch.fx.Node:
        """[T, T] bool: same sequence (and, if causal, key no later than query; flat order is token order)."""
        key = "causal_mask" if causal else "full_mask"
        if key not in self.indices:
            cur, self.cur = self.cur, None
            row = self.index("slot_batch")
            mask = self.call(aten.eq.Tensor, (self.call(aten.unsqueeze.default, (row, 1)),
                                              self.call(aten.unsqueeze.default, (row, 0))))
            if causal:
                flat = self.index("gather_index")
                earlier = self.call(aten.ge.Tensor, (self.call(aten.unsqueeze.default, (flat, 1)),
                                                     self.call(aten.unsqueeze.default, (flat, 0))))
                mask = self.call(aten.logical_and.default, (mask, earlier))
            self.indices[key] = mask
            self.cur = cur
        return self.indices[key]

    def attention(self, node: torch.fx.Node, step: Step) -> None:
        q, k, v = (self.get_packed(a) for a in node.args[:3])
        mask = self.block_mask(self.tokens.patterns[node] == "causal")
        kwargs = {k_: v_ for k_, v_ in node.kwargs.items() if k_ in ("scale", "enable_gqa")}
        # [T, heads, dim] -> [1, heads, T, dim]: one product over all packed tokens.
        heads = [self.call(aten.unsqueeze.default, (self.call(aten.permute.default, (t.node, [1, 0, 2])), 0))
                 for t in (q, k, v)]
        att = self.call(aten.scaled_dot_product_attention.default, (*heads, mask), kwargs)
        att = self.call(aten.permute.default, (self.call(aten.squeeze.dim, (att, 0)), [1, 0, 2]))
        self.set_packed(node, att, step)

    def pool(self, node: torch.fx.Node, step: Step) -> None:
        x = self.get_packed(node.args[0])
        keepdim = bool(structure.dim_arg(node, REDUCTIONS[node.target][1], "keepdim", False))
        rest = x.layout.rest
        sequences = self.call(aten.arange.default, (self.geo.batch,), {"dtype": torch.int64})
        owner = self.call(aten.eq.Tensor, (self.call(aten.unsqueeze.default, (sequences, 1)),
                                           self.call(aten.unsqueeze.default, (self.index("slot_batch"), 0))))
        dtype = structure.tensor_meta(node).dtype
        one_hot = self.call(aten._to_copy.default, (owner,), {"dtype": dtype})  # [B, T]
        flat = self.reshape(x.node, [-1, math.prod(rest)], [-1] + rest)
        # Each sum adds a sequence's own tokens; the zeros of other rows add nothing.
        summed = self.reshape(self.call(aten.mm.default, (one_hot, flat)), [self.geo.batch] + rest,
                              [self.geo.batch, math.prod(rest)])
        self.place_per_sequence(node, x, summed, keepdim)

    def select_position(self, node: torch.fx.Node, step: Step) -> None:
        x = self.get_packed(node.args[0])
        (position,) = step.dims  # 0: the plan refuses positions a run-time row may not have
        index = self.index("starts")
        if position:
            index = self.call(aten.add.Tensor, (index, position))
        self.place_per_sequence(node, x, self.call(aten.index_select.default, (x.node, 0, index)), keepdim=False)


RuntimePacker.emit = {**Packer.emit, Rule.ATTENTION: RuntimePacker.attention, Rule.POOL: RuntimePacker.pool,
                      Rule.SELECT_POSITION: RuntimePacker.select_position}


@register_pass("remove_padding_runtime", Exactness.EXACT,
               "compute only the valid tokens of any right-padded batch, found from the attention mask at "
               "run time: packed token-wise ops, block-diagonal attention over the packed tokens, scatter back",
               plan=plan_runtime, stage=Stage.PADDING, runs_after=("remove_padding", "prepack"))
def remove_padding_runtime(graph: ModelGraph, plan: RuntimePlan) -> PassResult:
    patterns = rebuild(graph, RuntimePacker(graph, plan))
    geo = plan.geometry
    return PassResult(graph, True, f"{describe(plan)}; {len(patterns)} block-diagonal attention calls",
                      RuntimePadding(geo.batch, geo.max_len, geo.expected_tokens, plan.source, patterns))


def rebuild(graph: ModelGraph, packer: RuntimePacker) -> tuple[str, ...]:
    """Replace ``graph``'s FX graph by ``packer``'s; each attention's pattern ("full" or "causal"), in order."""
    graph.gm.graph = packer.build()
    structure.remove_dead_code(graph.gm)
    return tuple(packer.tokens.patterns.values())


def describe(plan: RuntimePlan, priced: str = "") -> str:
    """What a run-time packing did, for the pass result; ``priced`` adds to what the tokens were priced at."""
    geo = plan.geometry
    return (f"packed the valid tokens of any right-padded {geo.batch}×{geo.max_len} batch at run time "
            f"(priced at {geo.expected_tokens} tokens{priced}, from the {plan.source})")
