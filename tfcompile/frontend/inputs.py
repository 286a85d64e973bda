"""Seeded example inputs for tracing, verification and measurement.

Integer inputs are token ids (uniform below the embedding table size) or masks
(all ones); float inputs are standard normal. The same seed gives the same
tensors, so the original and every variant see identical inputs.
"""

from __future__ import annotations

import torch

from tfcompile.frontend.limits import check_fits_in_memory, tensor_bytes

DEFAULT_SEED = 0


def is_mask_name(name: str) -> bool:
    return "mask" in name.lower()


def make_input(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    int_high: int = 2,
    generator: torch.Generator,
) -> torch.Tensor:
    if any(d <= 0 for d in shape):
        raise ValueError(f"input {name!r}: every dimension must be positive, got {shape}")
    # Asked before allocating: a dimension of 10^12 would otherwise end in an out-of-memory kill.
    check_fits_in_memory(tensor_bytes(shape, dtype.itemsize), f"input {name!r} of shape {shape}",
                         "lower --batch/--seq or the --input-shape dimensions")
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    if not dtype.is_floating_point:
        if is_mask_name(name):
            return torch.ones(shape, dtype=dtype)
        return torch.randint(0, max(int_high, 1), shape, dtype=dtype, generator=generator)
    return torch.randn(shape, generator=generator).to(dtype)


def seeded_generator(seed: int = DEFAULT_SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
