"""Shape and argument helpers every rewrite uses (one copy of each)."""

from __future__ import annotations

import torch
import torch.fx

from tfcompile.structure.core import tensor_meta


def shape_of(node: torch.fx.Node) -> tuple[int, ...] | None:
    value = tensor_meta(node)
    return None if value is None else tuple(int(s) for s in value.shape)


def prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def dim_arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
