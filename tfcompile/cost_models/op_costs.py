"""Per-op cost formulas: FLOPs and bytes moved, pure functions of shapes.

Each formula sees the node's input and output fake tensors (from
``meta['val']``) and returns an ``OpCost``. Ops that only reinterpret memory
(views, transposes, getitem) cost nothing. Anything else without a formula is
costed as elementwise: one FLOP per output element, inputs read once, output
written once.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Callable

import torch
import torch.fx

from tfcompile.structure.precision import LINEAR_INT8
from tfcompile.structure.varlen import SUM_SQ_LENGTHS, VARLEN_ATTENTION

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class OpCost:
    flops: float
    bytes_read: float
    bytes_written: float
    op_class: str  # one of device.OP_CLASSES, or "free"

    @property
    def bytes_moved(self) -> float:
        return self.bytes_read + self.bytes_written


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _vals(node: torch.fx.Node) -> list[torch.Tensor]:
    return [a.meta["val"] for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def _out(node: torch.fx.Node):
    return node.meta.get("val")


def output_bytes(node: torch.fx.Node) -> int:
    val = _out(node)
    if isinstance(val, (tuple, list)):
        return sum(_nbytes(v) for v in val)
    return _nbytes(val)


_FORMULAS: dict[object, Callable[[torch.fx.Node], OpCost]] = {}


def op_cost(*targets):
    def wrap(fn):
        for target in targets:
            if target in _FORMULAS:
                raise ValueError(f"cost formula for {target} registered twice")
            _FORMULAS[target] = fn
        return fn
    return wrap


FREE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.transpose.int, aten.t.default, aten.permute.default,
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.split.Tensor,
    aten.split_with_sizes.default, aten.unbind.int, aten.alias.default, aten.detach.default,
    aten.dropout.default, aten.flatten.using_ints, aten.unflatten.int, aten.chunk.default,
    aten._assert_tensor_metadata.default, aten.sym_size.int, operator.getitem,
}


@op_cost(aten.linear.default)
def _linear(node: torch.fx.Node) -> OpCost:
    x, w = node.args[0].meta["val"], node.args[1].meta["val"]
    tokens = x.numel() // x.shape[-1]
    flops = 2 * tokens * w.shape[0] * w.shape[1]
    return OpCost(flops, sum(_nbytes(v) for v in _vals(node)), output_bytes(node), "gemm")


@op_cost(LINEAR_INT8)
def _linear_int8(node: torch.fx.Node) -> OpCost:
    # The int8 weight is read (a quarter of fp32's bytes); quantizing the activation is one more pass over it.
    x, w = node.args[0].meta["val"], node.args[1].meta["val"]
    tokens = x.numel() // x.shape[-1]
    flops = 2 * tokens * w.shape[0] * w.shape[1]
    return OpCost(flops, 2 * _nbytes(x) + sum(_nbytes(v) for v in _vals(node)[1:]), output_bytes(node), "gemm")


@op_cost(aten.addmm.default)
def _addmm(node: torch.fx.Node) -> OpCost:
    a, b = node.args[1].meta["val"], node.args[2].meta["val"]
    return OpCost(2 * a.shape[0] * a.shape[1] * b.shape[1], sum(_nbytes(v) for v in _vals(node)),
                  output_bytes(node), "gemm")


@op_cost(aten.mm.default, aten.bmm.default, aten.matmul.default, aten.baddbmm.default)
def _matmul(node: torch.fx.Node) -> OpCost:
    vals = _vals(node)
    k = vals[-2].shape[-1]
    out = _out(node)
    return OpCost(2 * out.numel() * k, sum(_nbytes(v) for v in vals), output_bytes(node), "gemm")


@op_cost(aten.scaled_dot_product_attention.default)
def _sdpa(node: torch.fx.Node) -> OpCost:
    q, k, v = (node.args[i].meta["val"] for i in range(3))
    batch_heads = math.prod(q.shape[:-2])
    sq, sk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    flops = 2 * batch_heads * sq * sk * (d + dv) + 5 * batch_heads * sq * sk  # QK^T, PV, softmax
    if is_causal(node):
        flops /= 2
    return OpCost(flops, sum(_nbytes(v) for v in _vals(node)), output_bytes(node), "attention")


@op_cost(VARLEN_ATTENTION)
def _varlen_attention(node: torch.fx.Node) -> OpCost:
    q, k, v, offsets = (node.args[i].meta["val"] for i in range(4))
    heads, d = q.shape[1:]
    flops = (2 * (d + v.shape[-1]) + 5) * heads * _sum_sq_lengths(node)  # QK^T, PV, softmax over Σ l² pairs
    if node.args[5]:  # causal
        flops /= 2
    return OpCost(flops, sum(_nbytes(t) for t in (q, k, v, offsets)), output_bytes(node), "attention")


def _sum_sq_lengths(node: torch.fx.Node) -> float:
    """Σ l² of a varlen attention: what its pass recorded, else T²/B (equal lengths)."""
    if SUM_SQ_LENGTHS in node.meta:
        return float(node.meta[SUM_SQ_LENGTHS])
    tokens, sequences = node.args[0].meta["val"].shape[0], node.args[3].meta["val"].shape[0] - 1
    return tokens * tokens / max(sequences, 1)


def attention_score_bytes(node: torch.fx.Node) -> int:
    """Size of the B·H·Sq·Sk score tensor an unfused attention materialises."""
    q, k = (node.args[i].meta["val"] for i in range(2))
    if node.target is VARLEN_ATTENTION:
        return round(q.shape[1] * _sum_sq_lengths(node) * q.element_size())
    return math.prod(q.shape[:-1]) * k.shape[-2] * q.element_size()


# An attention that runs unfused (ONNX Runtime's export of SDPA) makes passes over its score tensor of three
# kinds, each fitted its own cost per byte since their kernels differ several-fold per element:
# - "scores": the QK^T MatMul writes it, Softmax reads and writes it, the PV MatMul reads it (4 passes);
# - "score_mask": a mask (float, or the constant triangle ``is_causal`` exports at fixed shapes) is broadcast
#   and added to it (one Add, read and write);
# - "score_guard": a boolean mask also adds IsNaN and Where over it, the guard for fully masked rows;
# - "score_masked": the entries a mask hides, which ORT's softmax exponentiates on a slow path
#   (``masked_scores``).
# - "score_reduce": a reduction over it (token merging sums the probabilities over heads and queries), which
#   ORT runs as a ReduceSum over non-contiguous axes at a fraction of a pass's speed (``score_tensors``).
SCORE_PASS_KINDS = ("scores", "score_mask", "score_guard", "score_masked", "score_reduce")
UNFUSED_SCORE_PASSES = 4


def is_causal(node: torch.fx.Node) -> bool:
    return bool(node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False))


def attention_mask_node(node: torch.fx.Node) -> torch.fx.Node | None:
    """An SDPA's ``attn_mask`` argument when it is a tensor of the graph, else None."""
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    return mask if isinstance(mask, torch.fx.Node) else None


def _attention_mask(node: torch.fx.Node):
    mask = attention_mask_node(node)
    return mask.meta.get("val") if mask is not None else None


def unfused_score_bytes(node: torch.fx.Node) -> dict[str, float]:
    """Bytes of score-tensor passes an SDPA makes when run unfused, per kind ({} for other nodes)."""
    if node.target is not aten.scaled_dot_product_attention.default:
        return {}
    score_bytes = float(attention_score_bytes(node))
    mask = _attention_mask(node)
    kinds = {"scores": UNFUSED_SCORE_PASSES * score_bytes}
    if isinstance(mask, torch.Tensor) or is_causal(node):
        kinds["score_mask"] = score_bytes
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        kinds["score_guard"] = score_bytes
    return kinds


@op_cost(aten.einsum.default)
def _einsum(node: torch.fx.Node) -> OpCost:
    # NB: one multiply-add per point of the full index space, as a naive
    # contraction would do; backends that reorder a 3+-operand einsum may do less.
    equation = node.args[0].replace(" ", "")
    operands = [o.meta["val"] for o in node.args[1]]
    inputs = equation.split("->")[0].split(",")
    extent: dict[str, int] = {}
    for letters, value in zip(inputs, operands):
        for letter, size in zip(letters.replace("...", ""), value.shape[-len(letters.replace("...", "")):]):
            extent[letter] = int(size)
    batch = math.prod(operands[0].shape[: operands[0].dim() - len(inputs[0].replace("...", ""))]) \
        if "..." in inputs[0] else 1
    flops = 2 * batch * math.prod(extent.values())
    return OpCost(flops, sum(_nbytes(v) for v in operands), output_bytes(node), "gemm")


@op_cost(aten.convolution.default, aten.conv2d.default)
def _conv(node: torch.fx.Node) -> OpCost:
    w = node.args[1].meta["val"]
    out = _out(node)
    flops = 2 * out.numel() * math.prod(w.shape[1:])
    return OpCost(flops, sum(_nbytes(v) for v in _vals(node)), output_bytes(node), "gemm")


@op_cost(aten.embedding.default, aten.index_select.default, aten.gather.default)
def _gather(node: torch.fx.Node) -> OpCost:
    # Only the gathered rows are read, not the whole table.
    out_bytes = output_bytes(node)
    idx = _vals(node)[-1]
    return OpCost(0, out_bytes + _nbytes(idx), out_bytes, "memory")


@op_cost(aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
         aten.group_norm.default)
def _norm(node: torch.fx.Node) -> OpCost:
    x = node.args[0].meta["val"]
    return OpCost(8 * x.numel(), sum(_nbytes(v) for v in _vals(node)), output_bytes(node), "norm")


@op_cost(aten.softmax.int, aten._softmax.default, aten._log_softmax.default)
def _softmax(node: torch.fx.Node) -> OpCost:
    x = node.args[0].meta["val"]
    return OpCost(5 * x.numel(), _nbytes(x), output_bytes(node), "softmax")


def _elementwise(node: torch.fx.Node) -> OpCost:
    out = _out(node)
    numel = out.numel() if isinstance(out, torch.Tensor) else 0
    return OpCost(numel, sum(_nbytes(v) for v in _vals(node)), output_bytes(node), "memory")


def source_through_free_ops(node: torch.fx.Node) -> torch.fx.Node:
    """The node ``node`` views, looking through the free ops (views, transposes, detaches) in between."""
    while node.op == "call_function" and len(node.all_input_nodes) == 1 and cost_of(node).op_class == "free":
        node = node.all_input_nodes[0]
    return node


def cost_of(node: torch.fx.Node) -> OpCost:
    if node.op != "call_function" or node.target in FREE_OPS:
        return OpCost(0, 0, 0, "free")
    return _FORMULAS.get(node.target, _elementwise)(node)


def dtype_name(node: torch.fx.Node) -> str:
    """The dtype a node computes in: its output's, except for ops whose arithmetic is narrower."""
    if node.target is LINEAR_INT8:
        return "int8"
    val = _out(node)
    if isinstance(val, (tuple, list)):
        val = next((v for v in val if isinstance(v, torch.Tensor)), None)
    dtype = getattr(val, "dtype", torch.float32)
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "int8"}.get(dtype, "fp32")


@op_cost(aten.topk.default)
def _topk(node: torch.fx.Node) -> OpCost:
    # A partial selection per row: about log2(k) compare-and-swaps per input element (heap).
    x = node.args[0].meta["val"]
    k = int(node.args[1]) if len(node.args) > 1 else 1
    return OpCost(x.numel() * max(1.0, math.log2(max(k, 2))), _nbytes(x), output_bytes(node), "memory")
