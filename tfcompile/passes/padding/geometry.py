"""Where the valid tokens of a right-padded batch go once packed, and the lengths that decide it.

Static shapes, by design: the lengths are baked into the rewritten graph (T,
the gather/scatter indices, the attention slices are constants), because ONNX
Runtime and TVM lowering here need fixed shapes, and per-length attention
slices are only static when the lengths are.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from tfcompile import structure
from tfcompile.errors import ShapeError
from tfcompile.graph import ModelGraph
from tfcompile.passes.base import PassRefused


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where the valid tokens of a right-padded [B, L] batch live once packed.

    Token j of sequence b sits at flat slot ``starts[b] + j``. ``groups`` are
    runs of equal-length sequences stored back to back (remove_padding only),
    each attended in one SDPA call; ``causal_block_mask``/``full_block_mask``
    are prepack's [rows, 1, C, C] attention masks."""

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

    @property
    def binned(self) -> bool:
        """Prepack's [rows, capacity] slots rather than remove_padding's one [T] axis."""
        return len(self.tok_dims) == 2

    @property
    def calls_per_attention(self) -> int:
        """SDPA calls that replace one attention: one per length group, or one over the binned rows."""
        return 1 if self.binned else len(self.groups)

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
    placed: dict[int, tuple[int, int]] = {}
    for b in order:
        row = next((r for r, used in enumerate(fill) if used + lengths[b] <= capacity), None)
        if row is None:
            fill.append(0)
            row = len(fill) - 1
        placed[b] = (row, fill[row])
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


def lengths_from_mask(mask: torch.Tensor, name: str = "attention_mask") -> list[int]:
    """Row lengths of a right-padded 0/1 mask [B, L]."""
    if mask.dim() != 2:
        raise PassRefused(f"mask input {name} has shape {list(mask.shape)}, not [batch, sequence]")
    values = mask.to(torch.float64)
    if not bool(((values == 0) | (values == 1)).all()):
        raise PassRefused(f"mask input {name} holds values other than 0 and 1")
    lengths = [int(n) for n in values.sum(dim=1).tolist()]
    for b, length in enumerate(lengths):
        if length == 0:
            raise ShapeError(f"{name} row {b} is empty (length 0): every sequence needs at least one token")
        if not bool((values[b, :length] == 1).all()):
            raise PassRefused(f"{name} row {b} is not right-padded (padding must follow the tokens)")
    return lengths


def check_lengths(lengths, batch: int, seq: int) -> list[int]:
    """``lengths`` as ints, or a ShapeError when they do not fit a [batch, seq] padded batch."""
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
    valid = structure.valid_mask(lengths, seq.seq)
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
