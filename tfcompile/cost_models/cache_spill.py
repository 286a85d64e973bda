"""Bytes that outgrow the cores' own caches: a cost the micro-benchmarks' small tensors never pay.

A memory-bound kernel (elementwise, activation, norm, softmax) whose tensors
fit in the level-2 caches of the cores running it streams them at L2 speed;
one whose tensors do not goes to the shared last-level cache, at a fraction
of that. On session 16's Xeon (2 MiB of L2 per core, 2 cores) the largest
elementwise micro-benchmarks (an 8-step chain over 2048 x 768, GELU over 2 M
values, a residual LayerNorm over 2048 x 768; 17-19 MB each) were predicted
28-51 % under on both ORT and TVM by coefficients that fitted the smaller ones
within 10 %, and minilm b8 s128's 6.3 MB score tensors cost TVM 9.3 ns a
score against 5.5 ns for a 3.1 MB one.

So a calibrated profile prices the bytes of such a kernel, and every pass of
an unfused attention over a score tensor larger than those caches, at a
``spill`` rate of its own, on top of the kernel's class rate (the fit finds
how much dearer they are). A step, not a curve: what is measured is whether
a tensor fits, and the fit has two points either side of it.
"""

from __future__ import annotations

import functools

from tfcompile.cost_models.device import known_device
from tfcompile.cost_models.score_passes import attention_traffic_bytes

# Kernel classes whose time is their bytes (calibration.kernel_class): GEMMs and attentions reuse what they
# read from cache many times over; their spills are in their own rates.
SPILL_CLASSES = {"memory", "activation", "norm", "norm_residual", "softmax"}


@functools.lru_cache(maxsize=None)
def core_cache_bytes(target: str) -> float:
    """The level-2 cache of every core ``target`` runs on, summed (0: not known, nothing spills)."""
    return float(device.core_cache_bytes) if (device := known_device(target)) is not None else 0.0


def kernel_spill_bytes(kernel, op_class: str, cache_bytes: float) -> float:
    """``kernel``'s bytes when they outgrow ``cache_bytes`` and its class streams them; else 0."""
    moved = kernel.bytes_moved
    return moved if cache_bytes and op_class in SPILL_CLASSES and moved > cache_bytes else 0.0


def score_spill_bytes(graph, target: str, backend: str) -> float:
    """Bytes of every pass of ``graph``'s unfused attentions over score tensors that outgrow the cores'
    caches (0 where the attention is fused or the caches are not known)."""
    cache_bytes = core_cache_bytes(target)
    return attention_traffic_bytes(graph, target, backend, cache_bytes) if cache_bytes else 0.0
