"""Padding removal (ByteTransformer) and prepacking (Prepacking) for right-padded batches.

``remove_padding`` rewrites a model that runs a right-padded [B, L] batch so
that it computes only the T = Σ l_b valid tokens:
- the token inputs are gathered to [T] with a constant index built from the
  prefix sum of the lengths (sequences ordered longest first);
- every token-wise op (embeddings, linears, norms, activations, residual adds)
  runs on [T, ...]; position and token-type embeddings are gathered at each
  token's own (b, j), so positions restart at 0 for every sequence;
- attention runs per sequence: one SDPA per run of equal-length sequences on
  [n, heads, l, dim] slices, never a masked T×T product, so attention costs
  Σ l_b² instead of B·L²;
- a mask-weighted sum over the sequence (sentence-embedding mean pooling, as in
  minilm) becomes a sum over each sequence's own tokens, and selecting one
  position (CLS pooling) reads it from the packed tokens;
- outputs still indexed by token are scattered back to [B, L, ...] with zeros
  at padded positions, so the variant keeps the original signature.

``prepack`` (decoder prefill) bin-packs the sequences first-fit decreasing into
rows of ``capacity`` tokens (default: the longest sequence) and runs dense rows
[rows, capacity] with a block-diagonal (causal) attention mask; positions
restart per sequence as above. Its attention costs rows·capacity² instead of
B·L², which pays when many short prompts share a row.

Static shapes, by design: the lengths are baked into the rewritten graph (T,
the gather/scatter indices, the attention slices are constants), because ONNX
Runtime and TVM lowering here need fixed shapes, and per-length attention
slices are only static when the lengths are. A variant is therefore valid only
for inputs with exactly those lengths, like any static-shape compile; the
attention mask input is kept in the signature but no longer read by attention.
Lengths come from the knob ``lengths=[...]`` or from the example attention
mask (``with_lengths`` builds padded example inputs for given lengths).

Preconditions (each refusal names the node and the reason):
- an integer [B, L] token input; masks, if any, of shape [B, L], 0/1, right
  padded (ones then zeros) and equal to the lengths;
- no op other than attention mixes tokens: a sequence convolution, BatchNorm,
  cumulative sums, pooling over the sequence that reads padded positions (an
  unmasked mean), reshapes across the token axes are refused;
- every attention is self-attention whose mask, evaluated on the example
  inputs, lets each valid query see exactly the valid keys of its own sequence,
  all of them ("full") or those up to itself ("causal"); masks that let valid
  tokens see padding (left padding, no mask in an encoder), additive biases
  (ALiBi) and other patterns are refused.
Empty rows (length 0) and lengths above L are user errors (``ShapeError``).

Exact: a valid token's output depends only on its own values through token-wise
ops, and on its own sequence's valid keys in attention, where padded keys had
weight exp(−∞) = 0 in the padded model; pooled sums dropped exact zeros. Only
the summation order of reductions (GEMM blocking, softmax over l instead of L
keys) changes. Outputs at padded positions are zeros instead of the padded
model's values, which were meaningless.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from tfcompile.errors import ShapeError
from tfcompile.graph import ModelGraph, clone
from tfcompile import structure
from tfcompile.passes.base import Exactness, PassResult, Stage, register_checked_pass
from tfcompile.passes.packing import Packer, Refusal

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where the valid tokens of a right-padded [B, L] batch live once packed.

    Token j of sequence b sits at flat slot ``starts[b] + j``. ``groups`` are
    runs of equal-length sequences stored back to back (remove_padding only),
    each attended in one SDPA call; ``block_mask`` is prepack's
    [rows, 1, C, C] attention mask."""

    batch: int
    max_len: int
    lengths: tuple[int, ...]
    starts: tuple[int, ...]
    tok_dims: tuple[int, ...]
    groups: tuple[tuple[int, int, int], ...] = ()  # (first slot, sequences, length)
    causal_block_mask: torch.Tensor | None = None
    full_block_mask: torch.Tensor | None = None

    @property
    def slots(self) -> int:
        return math.prod(self.tok_dims)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def _slot_owner(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Unused slots (prepack's bin remainders) read token (0, 0): any finite value will do,
        # since the block mask keeps them out of every valid token's attention.
        batch = torch.zeros(self.slots, dtype=torch.int64)
        pos = torch.zeros(self.slots, dtype=torch.int64)
        for b, (start, length) in enumerate(zip(self.starts, self.lengths)):
            batch[start:start + length] = b
            pos[start:start + length] = torch.arange(length)
        return batch, pos

    def slot_batch(self) -> torch.Tensor:
        return self._slot_owner()[0]

    def slot_position(self) -> torch.Tensor:
        return self._slot_owner()[1]

    def gather_index(self) -> torch.Tensor:
        batch, pos = self._slot_owner()
        return batch * self.max_len + pos

    def scatter_index(self) -> torch.Tensor:
        """For every padded position b*L+j: its slot, or ``slots`` (a zero row) when j is padding."""
        index = torch.full((self.batch * self.max_len,), self.slots, dtype=torch.int64)
        for b, (start, length) in enumerate(zip(self.starts, self.lengths)):
            index[b * self.max_len:b * self.max_len + length] = torch.arange(start, start + length)
        return index


def packed_geometry(lengths: list[int], max_len: int) -> Geometry:
    """remove_padding: one [T] axis, longest sequences first so equal lengths sit together."""
    order = sorted(range(len(lengths)), key=lambda b: (-lengths[b], b))
    starts = [0] * len(lengths)
    groups: list[list[int]] = []
    slot = 0
    for b in order:
        starts[b] = slot
        if groups and groups[-1][2] == lengths[b]:
            groups[-1][1] += 1
        else:
            groups.append([slot, 1, lengths[b]])
        slot += lengths[b]
    return Geometry(len(lengths), max_len, tuple(lengths), tuple(starts), (slot,),
                    tuple(tuple(g) for g in groups))


def binned_geometry(lengths: list[int], max_len: int, capacity: int) -> Geometry:
    """prepack: first-fit decreasing into rows of ``capacity`` tokens."""
    order = sorted(range(len(lengths)), key=lambda b: (-lengths[b], b))
    fill: list[int] = []
    members: list[list[int]] = []
    placed: dict[int, tuple[int, int]] = {}
    for b in order:
        row = next((r for r, used in enumerate(fill) if used + lengths[b] <= capacity), None)
        if row is None:
            fill.append(0)
            members.append([])
            row = len(fill) - 1
        placed[b] = (row, fill[row])
        members[row].append(b)
        fill[row] += lengths[b]
    rows = len(fill)
    starts = tuple(placed[b][0] * capacity + placed[b][1] for b in range(len(lengths)))
    masks = []
    for causal in (True, False):
        mask = torch.zeros(rows, 1, capacity, capacity, dtype=torch.bool)
        for b in range(len(lengths)):
            row, off = placed[b]
            block = torch.ones(lengths[b], lengths[b], dtype=torch.bool)
            mask[row, 0, off:off + lengths[b], off:off + lengths[b]] = block.tril() if causal else block
        for row in range(rows):
            # An unused slot attends to itself only: a query row with no key would give NaN,
            # and NaN values would leak through the zero attention weights into valid rows.
            for i in range(fill[row], capacity):
                mask[row, 0, i, i] = True
        masks.append(mask)
    return Geometry(len(lengths), max_len, tuple(lengths), starts, (rows, capacity),
                    causal_block_mask=masks[0], full_block_mask=masks[1])



def evaluate(graph: ModelGraph, nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, object]:
    """The values of ``nodes`` on the example inputs (to inspect attention masks)."""
    try:
        return structure.evaluate_nodes(graph, nodes)
    except ValueError as exc:
        raise Refusal(f"{exc} to inspect the attention mask") from exc


def lengths_from_mask(mask: torch.Tensor, name: str = "attention_mask") -> list[int]:
    """Row lengths of a right-padded 0/1 mask [B, L]."""
    if mask.dim() != 2:
        raise Refusal(f"mask input {name} has shape {list(mask.shape)}, not [batch, sequence]")
    values = mask.to(torch.float64)
    if not bool(((values == 0) | (values == 1)).all()):
        raise Refusal(f"mask input {name} holds values other than 0 and 1")
    lengths = [int(n) for n in values.sum(dim=1).tolist()]
    for b, length in enumerate(lengths):
        if length == 0:
            raise ShapeError(f"{name} row {b} is empty (length 0): every sequence needs at least one token")
        if not bool((values[b, :length] == 1).all()):
            raise Refusal(f"{name} row {b} is not right-padded (padding must follow the tokens)")
    return lengths


def check_lengths(lengths, batch: int, seq: int) -> list[int]:
    lengths = [int(n) for n in lengths]
    if len(lengths) != batch:
        raise ShapeError(f"{len(lengths)} lengths given for a batch of {batch}")
    for b, length in enumerate(lengths):
        if length <= 0:
            raise ShapeError(f"row {b} is empty (length {length}): every sequence needs at least one token")
        if length > seq:
            raise ShapeError(f"row {b} has length {length}, more than the padded length {seq}")
    return lengths


def with_lengths(graph: ModelGraph, lengths, pad_id: int = 0) -> ModelGraph:
    """``graph`` with example inputs of a right-padded batch: masks from ``lengths``, pad ids after them.

    The graph is shared, not copied (only the example inputs change); padding
    the token ids too makes the padded baseline realistic."""
    seq = structure.sequence_inputs(graph)
    if seq is None:
        raise ShapeError(f"{graph.name} has no [batch, sequence] token input to pad")
    lengths = check_lengths(lengths, seq.batch, seq.seq)
    valid = torch.arange(seq.seq).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    placeholders = graph.nodes("placeholder")
    inputs = list(graph.example_inputs)
    for node in seq.masks + seq.tokens:
        i = placeholders.index(node)
        if node in seq.masks:
            inputs[i] = valid.to(inputs[i].dtype)
        else:
            shaped = valid.reshape(valid.shape + (1,) * (inputs[i].dim() - 2))
            inputs[i] = torch.where(shaped, inputs[i], torch.full_like(inputs[i], pad_id))
    return dataclasses.replace(graph, example_inputs=tuple(inputs), info=dict(graph.info))


@dataclasses.dataclass(frozen=True)
class Plan:
    seq: structure.SequenceInputs
    lengths: list[int]
    patterns: dict
    zero_pad: dict  # node -> its (batch, sequence) axes, for values zero at padded positions


def _attention_pattern(site: structure.AttentionSite, value, lengths: list[int], seq: int) -> str:
    tril = torch.ones(seq, seq, dtype=torch.bool).tril()
    if value is None:
        allowed = tril if site.is_causal else torch.ones(seq, seq, dtype=torch.bool)
    else:
        if value.dim() < 2 or tuple(value.shape[-2:]) != (seq, seq):
            raise Refusal(f"{site.node.name} is not self-attention over the sequence "
                          f"(mask shape {list(value.shape)})")
        if value.dtype == torch.bool:
            allowed = value
        else:
            blocked = value <= torch.finfo(value.dtype).min / 2
            if not bool((blocked | (value == 0)).all()):
                raise Refusal(f"{site.node.name} adds a bias to the attention scores (e.g. ALiBi), "
                              "not a 0/−∞ mask")
            allowed = ~blocked
        if site.is_causal:
            allowed = allowed & tril
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    allowed = allowed.expand(len(lengths), -1, -1, -1)
    candidates = {"full", "causal"}
    for b, length in enumerate(lengths):
        rows = allowed[b, :, :length, :]
        if bool(rows[..., length:].any()):
            raise Refusal(f"{site.node.name} lets valid tokens of row {b} attend to padded positions: "
                          f"the attention mask does not agree with length {length} "
                          "(right padding with a key-padding or causal mask is required)")
        inner = rows[..., :length]
        if not bool(inner.all()):
            candidates.discard("full")
        if not bool((inner == tril[:length, :length]).all()):
            candidates.discard("causal")
    if not candidates:
        raise Refusal(f"{site.node.name}: within a sequence the attention mask is neither full nor causal")
    return "full" if "full" in candidates else "causal"


def _plan(graph: ModelGraph, lengths=None) -> Plan:
    seq = structure.sequence_inputs(graph)
    if seq is None:
        raise Refusal("no integer [batch, sequence] token input: padding removal needs token sequences")
    placeholders = graph.nodes("placeholder")
    mask_lengths = None
    for mask in seq.masks:
        value = graph.example_inputs[placeholders.index(mask)]
        if tuple(value.shape) != (seq.batch, seq.seq):
            raise Refusal(f"mask input {mask.name} has shape {list(value.shape)}, not [batch, sequence]")
        row_lengths = lengths_from_mask(value, mask.name)
        if mask_lengths is not None and row_lengths != mask_lengths:
            raise Refusal("the mask inputs disagree on the sequence lengths")
        mask_lengths = row_lengths
    if lengths is not None:
        lengths = check_lengths(lengths, seq.batch, seq.seq)
        if mask_lengths is not None and lengths != mask_lengths:
            raise ShapeError(f"lengths {lengths} disagree with the example attention mask "
                             f"(row lengths {mask_lengths}); build the inputs with with_lengths()")
    else:
        lengths = mask_lengths or [seq.seq] * seq.batch
    sites = structure.attention_sites(graph)
    masks = evaluate(graph, [s.mask for s in sites if s.mask is not None])
    patterns = {s.node: _attention_pattern(s, masks.get(s.mask), lengths, seq.seq) for s in sites}
    # A 0/1 right-padded mask is zero at every padded position, which is what makes a
    # mask-weighted sum over the sequence equal to the sum over valid tokens.
    return Plan(seq, lengths, patterns, {mask: (0, 1) for mask in seq.masks})


def _build(graph: ModelGraph, plan: Plan, geometry: Geometry) -> Packer:
    packer = Packer(graph, geometry, plan.seq.tokens, plan.patterns, plan.zero_pad)
    new = packer.build()
    graph.gm.graph = new
    # The mask construction that attention no longer reads goes away here; metadata asserts
    # on it would keep it alive, so they go first.
    while True:
        new.eliminate_dead_code()
        asserts = [n for n in new.nodes if n.op == "call_function" and n.target in structure.METADATA_OPS
                   and n.args and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "call_function"
                   and not structure.real_users(n.args[0])]
        if not asserts:
            return packer
        for node in asserts:
            new.erase_node(node)


def _dry_run(graph: ModelGraph, make_geometry) -> str | None:
    copy = clone(graph)  # the plan names nodes, so it must be made on the graph that is rebuilt
    try:
        plan = _plan(copy)
        _build(copy, plan, make_geometry(plan))
    except Refusal as refusal:
        return str(refusal)
    return None


def _summary_lengths(plan: Plan) -> str:
    batch, seq = plan.seq.batch, plan.seq.seq
    tokens = sum(plan.lengths)
    return f"{tokens} of {batch}×{seq} token slots ({1 - tokens / (batch * seq):.0%} padding)"


def _check_remove(graph: ModelGraph) -> str | None:
    return _dry_run(graph, lambda plan: packed_geometry(plan.lengths, plan.seq.seq))


@register_checked_pass("remove_padding", Exactness.EXACT,
               "compute only the valid tokens of a right-padded batch: packed token-wise ops, "
               "per-sequence attention, scatter back at the output", _check_remove, stage=Stage.PADDING)
def remove_padding(graph: ModelGraph, lengths=None) -> PassResult:
    try:
        plan = _plan(graph, lengths)
        if sum(plan.lengths) == plan.seq.batch * plan.seq.seq:
            return PassResult(graph, False, f"no padding: every row has the full length {plan.seq.seq} "
                                            "(give lengths=[...] or a padded attention mask)")
        geometry = packed_geometry(plan.lengths, plan.seq.seq)
        packer = _build(graph, plan, geometry)
    except Refusal as refusal:
        return PassResult(graph, False, str(refusal))
    graph.info["padding"] = {"lengths": list(plan.lengths), "tokens": geometry.tokens}
    return PassResult(graph, True, f"packed {_summary_lengths(plan)}; {packer.attention_calls} "
                                   f"attention calls over {len(geometry.groups)} length groups")


def _check_prepack(graph: ModelGraph) -> str | None:
    return _dry_run(graph, lambda plan: binned_geometry(plan.lengths, plan.seq.seq, max(plan.lengths)))


@register_checked_pass("prepack", Exactness.EXACT,
               "bin-pack the sequences of a right-padded batch into dense rows with block-diagonal "
               "attention masks and per-sequence positions (prefill)", _check_prepack, stage=Stage.PADDING, runs_after=('remove_padding',))
def prepack(graph: ModelGraph, lengths=None, capacity: int | None = None) -> PassResult:
    try:
        plan = _plan(graph, lengths)
        capacity = max(plan.lengths) if capacity is None else int(capacity)
        if capacity < max(plan.lengths):
            raise ShapeError(f"bin capacity {capacity} is shorter than the longest sequence "
                             f"({max(plan.lengths)})")
        geometry = binned_geometry(plan.lengths, plan.seq.seq, capacity)
        rows = geometry.tok_dims[0]
        if geometry.slots >= plan.seq.batch * plan.seq.seq:
            return PassResult(graph, False, f"no gain: {plan.seq.batch} sequences need {rows} rows of "
                                            f"{capacity} slots, no fewer than the padded batch")
        packer = _build(graph, plan, geometry)
    except Refusal as refusal:
        return PassResult(graph, False, str(refusal))
    graph.info["padding"] = {"lengths": list(plan.lengths), "rows": rows, "capacity": capacity}
    return PassResult(graph, True, f"prepacked {_summary_lengths(plan)} into {rows} rows of {capacity}; "
                                   f"{packer.attention_calls} block-diagonal attention calls")
