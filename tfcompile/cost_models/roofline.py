"""Roofline latency prediction: per kernel max(compute, memory) + overhead.

First cut: every non-free node is one kernel (no backend fusion rules yet).
Compute time = FLOPs / (peak for the dtype x class efficiency); memory time =
bytes / (bandwidth x memory efficiency of the class). Whole-graph runtimes
(NPUs) pay the overhead once per graph instead of once per kernel.
"""

from __future__ import annotations

import dataclasses

from tfcompile.cost_models.device import DeviceSpec
from tfcompile.cost_models.op_costs import cost_of, dtype_name
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

    @property
    def latency_ms(self) -> float:
        return self.latency_s * 1e3


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
    total = sum(k.latency_s for k in kernels)
    if device.overhead_per == "graph":
        total += device.kernel_overhead_s
    return CostEstimate(device.name, total, sum(k.flops for k in kernels), sum(k.bytes_moved for k in kernels),
                        tuple(kernels))
