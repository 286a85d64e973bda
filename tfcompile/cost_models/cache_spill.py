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

import torch

from tfcompile.cost_models.op_costs import attention_score_bytes

# Kernel classes whose time is their bytes (calibration.kernel_class): GEMMs and attentions reuse what they
# read from cache many times over; their spills are in their own rates.
SPILL_CLASSES = {"memory", "activation", "norm", "norm_residual", "softmax"}


@functools.lru_cache(maxsize=None)
def core_cache_bytes(target: str) -> float:
    """The level-2 cache of every core ``target`` runs on, summed (0: not known, nothing spills)."""
    return float(device.core_cache_bytes) if (device := _known_device(target)) is not None else 0.0


def _known_device(target: str):
    from tfcompile.cost_models.device import available_targets, load_device

    return load_device(target) if target in available_targets() else None


def kernel_spill_bytes(kernel, op_class: str, cache_bytes: float) -> float:
    """``kernel``'s bytes when they outgrow ``cache_bytes`` and its class streams them; else 0."""
    moved = kernel.bytes_moved
    return moved if cache_bytes and op_class in SPILL_CLASSES and moved > cache_bytes else 0.0


def score_spill_bytes(graph, target: str, backend: str) -> float:
    """Bytes of every pass of ``graph``'s unfused attentions over score tensors that outgrow the cores'
    caches (0 where the attention is fused)."""
    from tfcompile.cost_models.fusion import UNFUSED_ATTENTION_BACKENDS

    device = _known_device(target) if backend in UNFUSED_ATTENTION_BACKENDS else None
    cache_bytes = core_cache_bytes(target)
    if device is None or not cache_bytes or not device.attention_score_passes:
        return 0.0
    total = 0.0
    for node in graph.call_nodes():
        if node.target is torch.ops.aten.scaled_dot_product_attention.default:
            score_bytes = attention_score_bytes(node)
            total += device.attention_score_passes * score_bytes if score_bytes > cache_bytes else 0.0
    return total
