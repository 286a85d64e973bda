"""Backend fusion rules: group graph nodes into the kernels a backend runs.

The kernel, not the node, is the cost unit (as in nn-Meter): a fused
elementwise epilogue adds FLOPs but no DRAM round trip and no launch.

Rules per backend:
- ``ort`` and ``tvm``: an elementwise node whose only non-constant input is
  produced by a kernel with no other reader joins that kernel (GEMM + bias,
  chains of elementwise ops), as TVM's FuseOps and, for a GEMM's bias, ORT's
  Gemm do on CPU. On TVM also when the node reads other tensors besides (a
  residual add into its GEMM, a chain's ``x * y + y``): counted as separate
  kernels, the calibration's 8-step chains were 16 kernels of 19 MB each
  where TVM runs one, and the fit priced TVM's elementwise bytes at about
  nothing (1e-12 s a byte, session 16).
- ``ort`` runs a GELU as a node of its own (``Gelu``, an erf per element),
  never a GEMM's epilogue, and it costs several times an add per element: an
  ``activation`` kernel, a class of its own in the fit. Joined to its GEMM,
  the GELU micro-benchmarks were predicted 2-3x under measured and blocks of
  a model 18-29 % under (session 14's Xeon).
- ``ort`` runs a SiLU (Llama's FFN gate) as a ``QuickGelu`` node of its own
  too, an ``activation`` kernel alike (3 ms of llama-tiny b8 s256's run on
  session 15's Xeon, by ORT's profiler).
- ``tvm`` runs them as kernels of their own as well, unless they follow a
  linear over a 2-D input: a linear over a [B, S, K] input is imported as
  reshape, matmul, reshape, and FuseOps does not fuse an op past the reshape
  into the matmul, so the GELU after it is a PrimFunc of its own (``fused_reshape_gelu_reshape``: 6 ms of minilm b8
  s128's 299 ms, by the VM's instrument, session 16's Xeon). As a memory
  kernel its erf per element was priced as an add's: the GELU
  micro-benchmarks were predicted 70-96 % under on TVM (session 15).
- ``ort`` fuses a residual add whose only reader is a LayerNorm into that
  norm (``SkipLayerNormalization``), a kernel several times slower per
  element than ``LayerNormalization``: 0.38 against 0.08 ms at 128 x 768 on
  session 15's Xeon (ORT 1.32, 2 threads; ORT's profiler on bert-base, whose
  post-norm layers fuse all 25, and gpt2-small, whose pre-norm residuals
  have a second reader and fuse only the last). A ``norm_residual`` kernel,
  its own class in the fit.
- an accumulating scatter (``index_put`` with ``accumulate``, ``scatter_add``,
  ``index_add``; token merging's group sums) is a ``scatter`` kernel: ORT's
  ScatterND with reduction and the Expand and Concat that build its index
  tuples took 2.0 ms for 512 x 384 values, 10 ns a value (session 15's Xeon,
  ORT's profiler), where a memory kernel's rate would price 0.2 ms.
- ``ort`` also runs the ops torch only views: every reshape-like view is a
  ``Reshape``/``Unsqueeze`` node (a ``view`` kernel: no bytes, its own dispatch
  cost), and a permute that is not the last-two-axes swap a matmul reads (which
  ORT folds into ``FusedMatMul``/``Gemm``) is a ``Transpose`` that copies its
  tensor (a ``memory`` kernel). On minilm these were 96 Reshapes and 24
  Transposes, 10 % of the run, that a torch-graph count does not see.
- ``torch`` (eager): no fusion beyond what one ATen op already does, and every
  ATen op the graph calls is dispatched, views and permutes included: each is
  a ``view`` kernel (no bytes; the dispatch cost a calibration fits, a few µs
  in eager on a CPU host, about nothing in CUDA-graph replay). Counted as free,
  torch eager on the CPU was predicted 4× below its measured time on small
  models (benchmarks/gpu_check.py --device cpu --quick).
- ``roofline`` (no backend given): no fusion; the first-cut estimate.
"""

from __future__ import annotations

import dataclasses

import torch.fx

from tfcompile.cost_models.op_costs import OpCost, cost_of, dtype_name, source_through_free_ops
from tfcompile.cost_models.score_tensors import explicit_score_passes
from tfcompile.graph import ModelGraph, fetch_attr

FUSING_BACKENDS = {"ort", "tvm"}
# Backends that run attention as separate kernels over a score tensor: an attention written out op by op
# costs there what an SDPA does (score_tensors).
UNFUSED_ATTENTION_BACKENDS = {"ort", "tvm"}
aten = torch.ops.aten
# Views ONNX Runtime runs as nodes of their own (Reshape, Unsqueeze, Squeeze, Flatten).
ORT_VIEW_NODES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
                  aten.squeeze.dim, aten.squeeze.dims, aten.flatten.using_ints, aten.unflatten.int}
# Elementwise ops ONNX Runtime and TVM run as a kernel of their own with a transcendental per element.
ACTIVATIONS = {aten.gelu.default, aten.silu.default}
TRANSCENDENTALS = {aten.tanh.default, aten.erf.default, aten.sigmoid.default}
LAYER_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default}
# Scatters that add into their destination: ORT's ScatterND with reduction "add" and TVM's index_put loop go
# element by element, index tuple by index tuple.
ACCUMULATING_SCATTERS = {aten.index_put.default, aten.index_put_.default, aten.scatter_add.default,
                         aten.index_add.default, aten.scatter_reduce.two}
PERMUTES = {aten.permute.default, aten.transpose.int, aten.t.default}
MATMUL_READERS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.linear.default}


@dataclasses.dataclass
class Kernel:
    nodes: list[str]
    op_class: str  # class of the anchor (first) node
    flops: float
    bytes_read: float
    bytes_written: float
    dtype: str
    tokens: int  # rows of the GEMM's left operand (M), 0 for non-GEMMs
    # Bytes of the GEMM's constant operands (its weights, through any view or transpose of them); 0 otherwise.
    weight_bytes: float = 0.0

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


def _constant_operand_bytes(node: torch.fx.Node) -> int:
    """Bytes of ``node``'s operands that are parameters, looking through the views and casts between."""
    total = 0
    for source in map(source_through_free_ops, node.all_input_nodes):
        if _is_constant(source):
            # get_attr nodes carry no shape meta in every graph: read the parameter itself
            value = fetch_attr(source.graph.owning_module, source.target)
            total += value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
    return total


def group_kernels(graph: ModelGraph, backend: str | None = None) -> list[Kernel]:
    fuse = backend in FUSING_BACKENDS
    kernels: list[Kernel] = []
    kernel_of: dict[torch.fx.Node, Kernel] = {}
    # A view between a kernel and its epilogue does not stop fusion.
    alias_of: dict[torch.fx.Node, torch.fx.Node] = {}
    score_passes = explicit_score_passes(graph) if backend in UNFUSED_ATTENTION_BACKENDS else {}
    for node in graph.call_nodes():
        cost: OpCost = cost_of(node)
        if node.name in score_passes:
            # Its bytes are priced as score passes (calibration.score_pass_bytes); the matmuls keep their FLOPs.
            if score_passes[node.name].kernel:
                flops = cost.flops if cost.op_class == "gemm" else 0.0
                kernels.append(Kernel([node.name], "attention", flops, 0.0, 0.0, dtype_name(node), 0))
            continue
        if backend == "ort":
            cost = _as_ort_runs_it(node, cost)
        elif backend == "torch" and cost.op_class == "free" and isinstance(node.target, torch._ops.OpOverload):
            cost = OpCost(0, 0, 0, "view")
        if node.target in ACTIVATIONS and (backend == "ort" or backend == "tvm" and not _after_2d_linear(node)):
            cost = dataclasses.replace(cost, op_class="activation")
        if _accumulates(node):
            cost = dataclasses.replace(cost, op_class="scatter")
        if cost.op_class == "view":
            kernels.append(Kernel([node.name], "view", 0.0, 0.0, 0.0, dtype_name(node), 0))
            cost = OpCost(0, 0, 0, "free")  # and still an alias: a view does not stop an epilogue's fusion
        if cost.op_class == "free":
            sources = [alias_of.get(a, a) for a in node.all_input_nodes if not _is_constant(a)]
            if len(sources) == 1:
                alias_of[node] = sources[0]
            continue
        # A Transpose is a node of its own in ORT, never a GEMM's epilogue.
        fusable = fuse and cost.op_class == "memory" and node.target not in PERMUTES
        producer = _fusable_producer(node, alias_of, kernel_of, backend == "tvm") if fusable else None
        if backend == "tvm" and producer is not None and (_reshaped_linear(producer)
                                                          or _reads_gemm_reshaped(node, producer, kernel_of)):
            producer = None  # Relax's reshape after the matmul ends the kernel (its bias is inside)
        if producer is not None:
            kernel_of[node] = _absorb(kernel_of[producer], node, cost, producer)
            continue
        add = _residual_add(node, alias_of, kernel_of) if backend == "ort" else None
        if add is not None:
            kernel_of[node] = _absorb(kernel_of[add], node, cost, add)
            kernel_of[node].op_class = "norm_residual"
            continue
        gemm = cost.op_class == "gemm"
        kernel = Kernel([node.name], cost.op_class, cost.flops, cost.bytes_read, cost.bytes_written,
                        dtype_name(node), _gemm_rows(node) if gemm else 0,
                        float(_constant_operand_bytes(node)) if gemm else 0.0)
        kernels.append(kernel)
        kernel_of[node] = kernel
        if backend == "ort" and _reshaped_linear(node):
            # ORT runs a linear on [B, S, K] as Reshape, Gemm, Reshape (its Gemm takes 2-D operands).
            kernels += [Kernel([f"{node.name}.reshape{i}"], "view", 0.0, 0.0, 0.0, "fp32", 0) for i in (0, 1)]
    if backend == "tvm":
        # An elementwise kernel that evaluates a tanh or erf (GPT-2's GELU written out) costs as an activation.
        transcendental = {n.name for n in graph.call_nodes() if n.target in TRANSCENDENTALS}
        for kernel in kernels:
            if kernel.op_class == "memory" and transcendental.intersection(kernel.nodes):
                kernel.op_class = "activation"
    return kernels


def _absorb(kernel: Kernel, node: torch.fx.Node, cost: OpCost, producer: torch.fx.Node) -> Kernel:
    """``kernel`` with ``node`` run inside it: ``producer``'s output no longer goes to memory and back."""
    intermediate = _out_bytes(producer)
    kernel.nodes.append(node.name)
    kernel.flops += cost.flops
    kernel.bytes_read += max(cost.bytes_read - intermediate, 0)
    kernel.bytes_written += cost.bytes_written - intermediate
    return kernel


def _reshaped_linear(node: torch.fx.Node) -> bool:
    """A linear over a [B, S, K] input: ORT and Relax both run it as reshape, matmul (with its bias), reshape."""
    return node.target is aten.linear.default and node.args[0].meta["val"].dim() > 2


def _reads_gemm_reshaped(node: torch.fx.Node, producer: torch.fx.Node, kernel_of) -> bool:
    """Whether ``node`` reads ``producer``, a GEMM's kernel, through a view of another shape: GPT-2's Conv1D is
    an addmm over [B*S, K] viewed back to [B, S, N]. Relax imports the view as a reshape, which FuseOps does
    not put into a matmul's epilogue, so the GELU after it is a kernel of its own (session 16's TVM profile
    of gpt2-small: 19 ms of GELU kernels predicted inside the GEMMs)."""
    if kernel_of[producer].op_class != "gemm":
        return False
    shape = tuple(producer.meta["val"].shape) if isinstance(producer.meta.get("val"), torch.Tensor) else None
    return any(source_through_free_ops(a) is producer and isinstance(a.meta.get("val"), torch.Tensor)
               and tuple(a.meta["val"].shape) != shape for a in node.all_input_nodes if a is not producer)


def _after_2d_linear(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads a linear over a 2-D input, whose epilogue TVM fuses it into (no reshape between)."""
    arg = node.args[0]
    source = source_through_free_ops(arg) if isinstance(arg, torch.fx.Node) else None
    return (source is not None and source.target in (aten.linear.default, aten.addmm.default)
            and not _reshaped_linear(source) and tuple(arg.meta["val"].shape) == tuple(source.meta["val"].shape))


def _accumulates(node: torch.fx.Node) -> bool:
    if node.target not in ACCUMULATING_SCATTERS:
        return False
    if node.target in (aten.index_put.default, aten.index_put_.default):
        return bool(node.kwargs.get("accumulate", node.args[3] if len(node.args) > 3 else False))
    return True


def _residual_add(node: torch.fx.Node, alias_of, kernel_of) -> torch.fx.Node | None:
    """The add ORT fuses into ``node``'s SkipLayerNormalization: a LayerNorm's input that is an add of two
    same-shaped activations, a kernel of its own, read by nothing else. None for any other node."""
    if node.target not in LAYER_NORMS:
        return None
    add = alias_of.get(node.args[0], node.args[0])
    if add.target is not aten.add.Tensor or add not in kernel_of or kernel_of[add].nodes != [add.name]:
        return None
    operands = [a for a in add.args[:2] if isinstance(a, torch.fx.Node) and not _is_constant(a)]
    shape = add.meta["val"].shape
    same_shape = len(operands) == 2 and all(a.meta["val"].shape == shape for a in operands)
    return add if same_shape and _reader_count(add, add, alias_of) == 1 else None


def _as_ort_runs_it(node: torch.fx.Node, cost: OpCost) -> OpCost:
    """What ONNX Runtime runs for an op torch counts as free: a view node, or a Transpose copy."""
    if cost.op_class != "free" or not isinstance(node.meta.get("val"), torch.Tensor):
        return cost
    if node.target in ORT_VIEW_NODES:
        return OpCost(0, 0, 0, "view")
    if node.target in PERMUTES and not _swap_read_by_matmul(node):
        size = _out_bytes(node)
        return OpCost(0, size, size, "memory")
    return cost


def _swap_read_by_matmul(node: torch.fx.Node) -> bool:
    """A swap of the last two axes that only matmuls read: ORT's MatMul fusion takes it as transB."""
    rank = node.meta["val"].dim()
    if node.target is aten.permute.default:
        order = [d % rank for d in node.args[1]]
        swaps_last_two = order == list(range(rank - 2)) + [rank - 1, rank - 2]
    else:
        dims = sorted(d % rank for d in node.args[1:3]) if node.target is aten.transpose.int else [0, 1]
        swaps_last_two = rank >= 2 and dims == [rank - 2, rank - 1]
    return swaps_last_two and all(user.target in MATMUL_READERS for user in node.users)


def _fusable_producer(node, alias_of, kernel_of, other_inputs_read: bool = False):
    """The kernel ``node`` joins: its one non-constant input's, when nothing else reads that. With
    ``other_inputs_read`` (TVM's FuseOps), the first such input's even when ``node`` reads others too: they
    are read inside the kernel (the residual add after a GEMM, a chain's ``x * y + y``)."""
    sources = [alias_of.get(a, a) for a in node.all_input_nodes if not _is_constant(a)]
    if len(sources) != 1 and not other_inputs_read:
        return None
    for producer in sources:
        if producer in kernel_of and _reader_count(producer, producer, alias_of) == 1:
            return producer
    return None


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
