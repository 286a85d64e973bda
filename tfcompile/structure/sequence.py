"""Token sequence inputs and attention sites (padding removal, prepacking)."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from tfcompile.graph import ModelGraph
from tfcompile.structure.core import tensor_meta
from tfcompile.structure.shapes import dim_arg

aten = torch.ops.aten


# ---------------------------------------------------------------------------
# Token sequences and attention (padding removal, prepacking).

@dataclasses.dataclass(frozen=True)
class SequenceInputs:
    """The model inputs indexed by (batch, position): token ids and attention masks."""

    batch: int
    seq: int
    tokens: list[torch.fx.Node]  # integer [B, L, ...] inputs (ids, token types, positions)
    masks: list[torch.fx.Node]  # inputs named like a mask


def sequence_inputs(graph: ModelGraph) -> SequenceInputs | None:
    """None when the model has no integer [B, L] token input (e.g. a vision model)."""
    placeholders = graph.nodes("placeholder")
    names = list(graph.input_names) + [p.name for p in placeholders[len(graph.input_names):]]
    tokens, masks, size = [], [], None
    for node, name in zip(placeholders, names):
        value = tensor_meta(node)
        if value is None or value.dim() < 2:
            continue
        if "mask" in name.lower():
            masks.append(node)
        elif not value.dtype.is_floating_point and value.dtype != torch.bool:
            if size is None:
                size = tuple(int(s) for s in value.shape[:2])
            if tuple(value.shape[:2]) == size:
                tokens.append(node)
    if size is None:
        return None
    return SequenceInputs(size[0], size[1], tokens, masks)


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """An ``aten.scaled_dot_product_attention`` node and its masking arguments."""

    node: torch.fx.Node
    mask: torch.fx.Node | None
    is_causal: bool


def attention_sites(graph: ModelGraph) -> list[AttentionSite]:
    sites = []
    for node in graph.call_nodes():
        if node.target is not aten.scaled_dot_product_attention.default:
            continue
        mask = dim_arg(node, 3, "attn_mask")
        sites.append(AttentionSite(node, mask if isinstance(mask, torch.fx.Node) else None,
                                   bool(dim_arg(node, 5, "is_causal", False))))
    return sites


def valid_mask(lengths, seq: int) -> torch.Tensor:
    """[B, seq] booleans: True at each right-padded sequence's first ``lengths[b]`` positions."""
    return torch.arange(seq)[None, :] < torch.tensor(list(lengths))[:, None]
