"""The padded batch a graph runs: its token inputs, the valid lengths, each attention's pattern.

Lengths come from the workload (``context.workload.lengths``) when given,
else from the example attention mask; when both exist they must agree
(``with_lengths`` builds padded example inputs for given lengths). Every
attention must be self-attention whose mask, evaluated on the example inputs,
lets each valid query see exactly the valid keys of its own sequence: all of
them ("full") or those up to itself ("causal"). Masks that let valid tokens
see padding (left padding, no mask in an encoder), additive biases (ALiBi)
and other patterns are refused.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from tfcompile import structure
from tfcompile.errors import ShapeError
from tfcompile.graph import ModelGraph
from tfcompile.passes.base import PassRefused
from tfcompile.passes.context import Workload
from tfcompile.passes.padding.geometry import check_lengths, lengths_from_mask


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
    inputs: structure.SequenceInputs
    lengths: tuple[int, ...]
    patterns: dict[torch.fx.Node, str]  # attention node -> "full" or "causal" within a sequence
    # Inputs zero at every padded position, with their (batch, sequence) axes: a 0/1
    # right-padded mask is, which makes a mask-weighted sum over the sequence equal
    # to the sum over the valid tokens.
    zero_pad: dict[torch.fx.Node, tuple[int, ...]]

    @property
    def batch(self) -> int:
        return self.inputs.batch

    @property
    def max_len(self) -> int:
        return self.inputs.seq

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def describe(self) -> str:
        slots = self.batch * self.max_len
        return f"{self.tokens} of {self.batch}×{self.max_len} token slots ({1 - self.tokens / slots:.0%} padding)"


def read_padded_batch(graph: ModelGraph, workload: Workload) -> PaddedBatch:
    """The batch's lengths and attention patterns; refuses when they do not make packing exact."""
    seq = structure.sequence_inputs(graph)
    if seq is None:
        raise PassRefused("no integer [batch, sequence] token input: padding removal needs token sequences")
    placeholders = graph.nodes("placeholder")
    mask_lengths = None
    for mask in seq.masks:
        value = graph.example_inputs[placeholders.index(mask)]
        if tuple(value.shape) != (seq.batch, seq.seq):
            raise PassRefused(f"mask input {mask.name} has shape {list(value.shape)}, not [batch, sequence]")
        row_lengths = lengths_from_mask(value, mask.name)
        if mask_lengths is not None and row_lengths != mask_lengths:
            raise PassRefused("the mask inputs disagree on the sequence lengths")
        mask_lengths = row_lengths
    if workload.lengths is not None:
        lengths = check_lengths(workload.lengths, seq.batch, seq.seq)
        if mask_lengths is not None and lengths != mask_lengths:
            raise ShapeError(f"lengths {lengths} disagree with the example attention mask "
                             f"(row lengths {mask_lengths}); build the inputs with with_lengths()")
    else:
        lengths = mask_lengths or [seq.seq] * seq.batch
    sites = structure.attention_sites(graph)
    try:
        masks = structure.evaluate_nodes(graph, [s.mask for s in sites if s.mask is not None])
    except ValueError as exc:
        raise PassRefused(f"{exc} to inspect the attention mask") from exc
    patterns = {s.node: _attention_pattern(s, masks.get(s.mask), lengths, seq.seq) for s in sites}
    return PaddedBatch(seq, tuple(lengths), patterns, {mask: (0, 1) for mask in seq.masks})


def _attention_pattern(site: structure.AttentionSite, value, lengths: list[int], seq: int) -> str:
    tril = torch.ones(seq, seq, dtype=torch.bool).tril()
    if value is None:
        allowed = tril if site.is_causal else torch.ones(seq, seq, dtype=torch.bool)
    else:
        if value.dim() < 2 or tuple(value.shape[-2:]) != (seq, seq):
            raise PassRefused(f"{site.node.name} is not self-attention over the sequence "
                              f"(mask shape {list(value.shape)})")
        if value.dtype == torch.bool:
            allowed = value
        else:
            blocked = value <= torch.finfo(value.dtype).min / 2
            if not bool((blocked | (value == 0)).all()):
                raise PassRefused(f"{site.node.name} adds a bias to the attention scores (e.g. ALiBi), "
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
            raise PassRefused(f"{site.node.name} lets valid tokens of row {b} attend to padded positions: "
                              f"the attention mask does not agree with length {length} "
                              "(right padding with a key-padding or causal mask is required)")
        inner = rows[..., :length]
        if not bool(inner.all()):
            candidates.discard("full")
        if not bool((inner == tril[:length, :length]).all()):
            candidates.discard("causal")
    if not candidates:
        raise PassRefused(f"{site.node.name}: within a sequence the attention mask is neither full nor causal")
    return "full" if "full" in candidates else "causal"
