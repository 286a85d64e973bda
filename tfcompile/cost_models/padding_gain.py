"""Ideal gains of padding removal and prepacking (techniques.md §4).

With p = 1 − Σl/(B·L), token-wise work (GEMMs, norms, activations) shrinks by
B·L/Σl = 1/(1−p); per-sequence attention by B·L²/Σl²; prepacked dense rows by
B·L/(rows·capacity) for token-wise work and B·L²/(rows·capacity²) for
attention. These are upper bounds: gather/scatter (O(Σl·d)) and the extra
attention kernels cost something, and nothing is gained at B = 1 or small p.
The roofline (``tfcompile.cost_models.estimate``) prices the rewritten graph
from its own shapes, so its predicted ratio includes those overheads.
"""

from __future__ import annotations

import dataclasses

from tfcompile.errors import ShapeError


@dataclasses.dataclass(frozen=True)
class IdealSpeedup:
    token_wise: float  # B·L / Σl
    attention: float  # B·L² / Σl²
    padding_fraction: float  # p


def _checked(lengths, max_len: int) -> list[int]:
    lengths = [int(n) for n in lengths]
    if not lengths or any(n <= 0 or n > max_len for n in lengths):
        raise ShapeError(f"lengths must lie in [1, {max_len}], got {lengths}")
    return lengths


def ideal_speedup(lengths, max_len: int) -> IdealSpeedup:
    """Ideal work ratios, padded over packed, for a right-padded batch of ``lengths`` in ``max_len``."""
    lengths = _checked(lengths, max_len)
    tokens = sum(lengths)
    padded = len(lengths) * max_len
    return IdealSpeedup(padded / tokens, len(lengths) * max_len ** 2 / sum(n * n for n in lengths),
                        1 - tokens / padded)


def prepack_speedup(lengths, max_len: int, rows: int, capacity: int) -> IdealSpeedup:
    """The same ratios for ``rows`` dense rows of ``capacity`` slots (block-diagonal masks)."""
    lengths = _checked(lengths, max_len)
    padded = len(lengths) * max_len
    return IdealSpeedup(padded / (rows * capacity), len(lengths) * max_len ** 2 / (rows * capacity ** 2),
                        1 - sum(lengths) / padded)
