"""Attention written out op by op: find its score tensors and price their passes like an unfused SDPA's.

A pass that needs the attention probabilities (token merging's size-weighted
attention, importance scores summed over them) writes attention as
``matmul(q, kᵀ)``, a scale, a bias or mask, ``softmax`` and ``matmul(p, v)``.
ONNX Runtime runs those as the same kernels it runs for an exported SDPA
(FusedMatMul, Add or Where, Softmax, MatMul), so they cost what an SDPA's
passes over its score tensor cost (``op_costs.unfused_score_bytes``), not what
a weight GEMM and a small softmax cost: priced as such, minilm at 512 tokens
with token merging was predicted 1.94x faster than its baseline and measured
1.00x (session 13's Xeon), its B·H·S² score tensors seen as a few GEMM FLOPs.

A score tensor is the output of a matmul of two activations that is larger
than either operand (``q·kᵀ`` with the head size below the keys' count), and
whatever elementwise op, softmax or view keeps its size. Its passes, per kind:
- "scores": the producing matmul writes it (1), a softmax reads and writes it
  (2), the matmul with the values reads it (1): the four of an SDPA;
- "score_mask": every other op that keeps its size (the mask's Add or Where,
  a bias) reads and writes it about once, as the SDPA's mask Add does;
- "score_reduce": an op that shrinks it (token merging's sum over heads and
  queries) reads it once; ORT's ReduceSum over those non-contiguous axes took
  5-14 ms for minilm's 12 MB at 512 tokens (session 15's Xeon), several times
  a mask pass, so it is a kind of its own;
- a multiplication by a scalar straight after the producing matmul is folded
  into it (ORT's MatMulScaleFusion: FusedMatMul's alpha) and costs nothing.
The matmuls keep their FLOPs, as "attention" kernels; the ops between them are
kernels of no FLOPs and no bytes of their own (their launch cost only), since
their bytes are priced here.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from tfcompile.cost_models.op_costs import cost_of, output_bytes, source_through_free_ops

aten = torch.ops.aten
ACTIVATION_MATMULS = {aten.matmul.default, aten.bmm.default}
SOFTMAXES = {aten.softmax.int, aten._softmax.default}


@dataclasses.dataclass(frozen=True)
class ScorePass:
    """What one node does to a score tensor: the bytes it moves per kind, and whether it launches a kernel."""
    bytes_by_kind: dict[str, float]
    kernel: bool = True


def _is_activation(node: torch.fx.Node) -> bool:
    """Not a parameter or constant, looking through the views and casts in between."""
    node = source_through_free_ops(node)
    return node.op != "get_attr" and isinstance(node.meta.get("val"), torch.Tensor)


def _numel(node) -> int:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.numel() if isinstance(val, torch.Tensor) else 0


def _is_scalar(arg) -> bool:
    return not isinstance(arg, torch.fx.Node) or _numel(arg) == 1


def explicit_score_passes(graph) -> dict[str, ScorePass]:
    """Per node name: the passes it makes over an explicit attention's score tensor ({} when there is none)."""
    passes: dict[str, ScorePass] = {}
    score_of: dict[torch.fx.Node, torch.fx.Node] = {}  # node -> the matmul whose score tensor it holds
    for node in graph.call_nodes():
        if node.op != "call_function":
            continue
        operands = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        scored = [a for a in operands if a in score_of]
        if node.target in ACTIVATION_MATMULS and len(operands) == 2 and all(map(_is_activation, operands)):
            if scored:  # probabilities times values: one read of the scores
                passes[node.name] = ScorePass({"scores": float(output_bytes(scored[0]))})
            elif _numel(node) > max(_numel(a) for a in operands):
                passes[node.name] = ScorePass({"scores": float(output_bytes(node))})
                score_of[node] = node
            continue
        if not scored:
            continue
        source = scored[0]
        cost = cost_of(node)
        size = float(output_bytes(source))
        if cost.op_class == "free":
            if _numel(node) == _numel(source):
                score_of[node] = score_of[source]
            continue
        keeps_size = _numel(node) == _numel(source)
        if node.target in SOFTMAXES:
            passes[node.name] = ScorePass({"scores": 2 * size})
        elif (node.target is aten.mul.Tensor and score_of[source] is source and keeps_size
              and all(_is_scalar(a) for a in node.args if a is not source)):
            passes[node.name] = ScorePass({}, kernel=False)
        else:
            passes[node.name] = ScorePass({"score_mask" if keeps_size else "score_reduce": size})
        if keeps_size:
            score_of[node] = score_of[source]
    return passes


def explicit_score_bytes(graph) -> dict[str, float]:
    """Bytes per kind of every explicit attention's passes over its score tensors."""
    totals: dict[str, float] = {}
    for score_pass in explicit_score_passes(graph).values():
        for kind, size in score_pass.bytes_by_kind.items():
            totals[kind] = totals.get(kind, 0.0) + size
    return totals
