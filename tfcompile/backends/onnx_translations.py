"""ONNX translations for tfcompile's own torch ops, handed to the dynamo exporter.

``tfcompile::linear_int8`` becomes the nodes ``onnxruntime.quantization.quantize_dynamic``
writes for a per-column quantized MatMul: ``DynamicQuantizeLinear`` on the activation,
``MatMulInteger``, a cast, the two scales multiplied, and the bias. ONNX Runtime's graph
optimizer fuses them into ``DynamicQuantizeMatMul``; its result equals the torch op's.

``tfcompile::varlen_attention`` becomes attention over all T packed tokens with
the block-diagonal mask rebuilt from the offsets (each token's sequence is the
number of sequence ends at or before it): the same scores and weights, T² of
them, since no ONNX Runtime CPU kernel attends by offsets.
"""

from __future__ import annotations

from onnxscript import opset18 as op

from tfcompile.structure.precision import LINEAR_INT8
from tfcompile.structure.varlen import VARLEN_ATTENTION

FLOAT = 1  # onnx.TensorProto.FLOAT
INT64 = 7  # onnx.TensorProto.INT64


def linear_int8(x, weight_q, weight_zero_point, weight_scale, bias):
    x_q, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
    accumulated = op.MatMulInteger(x_q, weight_q, x_zero_point, weight_zero_point)
    return op.Add(op.Mul(op.Cast(accumulated, to=FLOAT), op.Mul(x_scale, weight_scale)), bias)


def varlen_attention(q, k, v, offsets, max_len: int, causal: bool, scale: float):
    tokens = op.Gather(op.Shape(q), op.Constant(value_ints=[0]))
    positions = op.Range(op.Constant(value_int=0), op.Squeeze(tokens), op.Constant(value_int=1))  # [T]
    ends = op.Slice(offsets, op.Constant(value_ints=[1]), op.Constant(value_ints=[2**62]))  # [B]
    column, row = op.Constant(value_ints=[1]), op.Constant(value_ints=[0])
    ended = op.Cast(op.GreaterOrEqual(op.Unsqueeze(positions, column), op.Unsqueeze(ends, row)), to=INT64)
    sequence = op.ReduceSum(ended, column, keepdims=0)  # [T]: sequence ends at or before each token
    allowed = op.Equal(op.Unsqueeze(sequence, column), op.Unsqueeze(sequence, row))  # [T, T]
    if causal:
        allowed = op.And(allowed, op.GreaterOrEqual(op.Unsqueeze(positions, column), op.Unsqueeze(positions, row)))
    heads_first = [1, 0, 2]  # [T, heads, dim] <-> [heads, T, dim]
    scores = op.Mul(op.MatMul(op.Transpose(q, perm=heads_first), op.Transpose(k, perm=[1, 2, 0])),
                    op.CastLike(op.Constant(value_float=scale), q))
    hidden = op.CastLike(op.Constant(value_float=float("-inf")), scores)
    weights = op.Softmax(op.Where(allowed, scores, hidden), axis=-1)
    return op.Transpose(op.MatMul(weights, op.Transpose(v, perm=heads_first)), perm=heads_first)


TRANSLATIONS = {LINEAR_INT8: linear_int8, VARLEN_ATTENTION: varlen_attention}
