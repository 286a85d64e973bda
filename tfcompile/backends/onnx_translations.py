"""ONNX translations for tfcompile's own torch ops, handed to the dynamo exporter.

``tfcompile::linear_int8`` becomes the nodes ``onnxruntime.quantization.quantize_dynamic``
writes for a per-column quantized MatMul: ``DynamicQuantizeLinear`` on the activation,
``MatMulInteger``, a cast, the two scales multiplied, and the bias. ONNX Runtime's graph
optimizer fuses them into ``DynamicQuantizeMatMul``; its result equals the torch op's.
"""

from __future__ import annotations

from onnxscript import opset18 as op

from tfcompile.structure.precision import LINEAR_INT8

FLOAT = 1  # onnx.TensorProto.FLOAT


def linear_int8(x, weight_q, weight_zero_point, weight_scale, bias):
    x_q, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
    accumulated = op.MatMulInteger(x_q, weight_q, x_zero_point, weight_zero_point)
    return op.Add(op.Mul(op.Cast(accumulated, to=FLOAT), op.Mul(x_scale, weight_scale)), bias)


TRANSLATIONS = {LINEAR_INT8: linear_int8}
