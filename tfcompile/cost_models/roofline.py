"""Roofline latency prediction: per kernel max(compute, memory) + overhead.

First cut: every non-free node is one kernel (no backend fusion rules yet).
Compute time = FLOPs / (peak for the dtype x class efficiency); memory time =
bytes / (bandwidth x memory efficiency of the class). Whole-graph runtimes
(NPUs) pay the overhead once per graph instead of once per kernel. On devices
whose runtimes have no fused attention kernel (``[attention] score_passes`` in
the device file: this CPU), an attention whose score tensor outgrows the
last-level cache also moves that tensor ``score_passes`` times through DRAM,
costed as one more memory-bound kernel (the mask, softmax and guard ops that
run between its two matmuls).
"""

from __future__ import annotations

import dataclasses

import torch

from tfcompile.cost_models.device import DeviceSpec
from tfcompile.cost_models.op_costs import attention_score_bytes, cost_of, dtype_name
from tfcompile.graph import ModelGraph

_MEMORY_CLASS = {"gemm": "memory", "attention": "memory", "memory": "memory", "norm": "norm",
                 "softmax": "softmax"}


@dataclasses.dataclass(frozen=True)
class KernelEstimate:
    node: str
    op_class: str
    flops: float
    bytes_moved: float
    latency_s: float
    bound: str  # "compute" | "memory" | "overhead"


@dataclasses.dataclass(frozen=True)
class CostEstimate:
    device: str
    latency_s: float
    flops: float
    bytes_moved: float
    kernels: tuple[KernelEstimate, ...]


def score_traffic_bytes(node, device: DeviceSpec, cache_bytes: float | None = None) -> float:
    """Traffic of an unfused attention's score tensor, when it does not fit in ``cache_bytes`` (default: the
    last-level cache, so the traffic is DRAM's)."""
    if not device.attention_score_passes or node.target is not torch.ops.aten.scaled_dot_product_attention.default:
        return 0.0
    score_bytes = attention_score_bytes(node)
    cache_bytes = device.cache_bytes if cache_bytes is None else cache_bytes
    return device.attention_score_passes * score_bytes if score_bytes > cache_bytes else 0.0


def estimate(graph: ModelGraph, device: DeviceSpec) -> CostEstimate:
    kernels = []
    for node in graph.call_nodes():
        cost = cost_of(node)
        if cost.op_class == "free":
            continue
        peak = device.peak_for(dtype_name(node)) * device.efficiency.get(cost.op_class, device.efficiency["gemm"])
        bandwidth = device.mem_bandwidth_bytes_per_s * device.efficiency[_MEMORY_CLASS[cost.op_class]]
        compute_s = cost.flops / peak if cost.flops else 0.0
        memory_s = cost.bytes_moved / bandwidth
        overhead_s = device.kernel_overhead_s if device.overhead_per == "kernel" else 0.0
        bound = "compute" if compute_s >= memory_s else "memory"
        if overhead_s > max(compute_s, memory_s):
            bound = "overhead"
        kernels.append(KernelEstimate(node.name, cost.op_class, cost.flops, cost.bytes_moved,
                                      max(compute_s, memory_s) + overhead_s, bound))
        score_bytes = score_traffic_bytes(node, device)
        if score_bytes:
            # Separate elementwise kernels between the two matmuls: they add to the time, not overlap.
            kernels.append(KernelEstimate(f"{node.name}.scores", "memory", 0.0, score_bytes,
                                          score_bytes / (device.mem_bandwidth_bytes_per_s
                                                         * device.efficiency["memory"]),
                                          "memory"))
    total = sum(k.latency_s for k in kernels)
    if device.overhead_per == "graph":
        total += device.kernel_overhead_s
    return CostEstimate(device.name, total, sum(k.flops for k in kernels), sum(k.bytes_moved for k in kernels),
                        tuple(kernels))
