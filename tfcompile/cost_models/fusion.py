"""Backend fusion rules: group graph nodes into the kernels a backend runs.

The kernel, not the node, is the cost unit (as in nn-Meter): a fused
elementwise epilogue adds FLOPs but no DRAM round trip and no launch.

Rules per backend:
- ``ort`` and ``tvm``: an elementwise node whose only non-constant input is
  produced by a kernel with no other reader joins that kernel (GEMM + bias +
  GELU, chains of elementwise ops). ORT's graph optimiser and TVM's FuseOps
  both do this on CPU.
- ``torch`` (eager): no fusion beyond what one ATen op already does.
- ``roofline`` (no backend given): no fusion; the first-cut estimate.
"""

from __future__ import annotations

import dataclasses

import torch.fx

from tfcompile.cost_models.op_costs import OpCost, cost_of, dtype_name
from tfcompile.graph import ModelGraph

FUSING_BACKENDS = {"ort", "tvm"}


@dataclasses.dataclass
class Kernel:
    nodes: list[str]
    op_class: str  # class of the anchor (first) node
    flops: float
    bytes_read: float
    bytes_written: float
    dtype: str
    tokens: int  # rows of the GEMM's left operand (M), 0 for non-GEMMs

    @property
    def bytes_moved(self) -> float:
        return self.bytes_read + self.bytes_written


def _gemm_rows(node: torch.fx.Node) -> int:
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    vals = [v for v in vals if isinstance(v, torch.Tensor)]
    if node.target is torch.ops.aten.addmm.default and len(vals) >= 2:
        return int(vals[1].shape[0])
    if vals and vals[0].dim() >= 2:
        return int(vals[0].numel() // vals[0].shape[-1])
    return 0


def _is_constant(node: torch.fx.Node) -> bool:
    return node.op == "get_attr"


def group_kernels(graph: ModelGraph, backend: str | None = None) -> list[Kernel]:
    fuse = backend in FUSING_BACKENDS
    kernels: list[Kernel] = []
    kernel_of: dict[torch.fx.Node, Kernel] = {}
    # A view between a kernel and its epilogue does not stop fusion.
    alias_of: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.call_nodes():
        cost: OpCost = cost_of(node)
        if cost.op_class == "free":
            sources = [alias_of.get(a, a) for a in node.all_input_nodes if not _is_constant(a)]
            if len(sources) == 1:
                alias_of[node] = sources[0]
            continue
        producer = _fusable_producer(node, alias_of, kernel_of) if fuse and cost.op_class == "memory" else None
        if producer is not None:
            kernel = kernel_of[producer]
            intermediate = _out_bytes(producer)
            kernel.nodes.append(node.name)
            kernel.flops += cost.flops
            kernel.bytes_read += max(cost.bytes_read - intermediate, 0)
            kernel.bytes_written += cost.bytes_written - intermediate
            kernel_of[node] = kernel
            continue
        kernel = Kernel([node.name], cost.op_class, cost.flops, cost.bytes_read, cost.bytes_written,
                        dtype_name(node), _gemm_rows(node) if cost.op_class == "gemm" else 0)
        kernels.append(kernel)
        kernel_of[node] = kernel
    return kernels


def _fusable_producer(node, alias_of, kernel_of):
    sources = [alias_of.get(a, a) for a in node.all_input_nodes if not _is_constant(a)]
    if len(sources) != 1 or sources[0] not in kernel_of:
        return None
    producer = sources[0]
    if _reader_count(producer, producer, alias_of) != 1:
        return None
    return producer


def _reader_count(node: torch.fx.Node, root: torch.fx.Node, alias_of) -> int:
    """Readers of ``root`` through ``node``, looking through the views that alias it."""
    count = 0
    for user in node.users:
        if alias_of.get(user) is root:
            count += _reader_count(user, root, alias_of)
        else:
            count += 1
    return count


def _out_bytes(node: torch.fx.Node) -> int:
    val = node.meta.get("val")
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0
