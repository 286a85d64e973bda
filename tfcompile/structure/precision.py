"""The dynamically quantized linear layer, as one torch op a graph can hold.

``tfcompile::linear_int8(x, weight_q, weight_zero_point, weight_scale, bias)``
is what ONNX Runtime runs for a dynamically quantized ``aten.linear``:

- the activation is quantized per tensor, per call, to uint8 with ONNX's
  ``DynamicQuantizeLinear`` rule (the range always holds 0; scale = range/255,
  zero point = round(-min/scale), rounding half to even, saturating);
- the weight was quantized once, per output column, to int8 (symmetric, so
  its zero points are 0), stored ``[in, out]`` as ``MatMulInteger`` takes it;
- the int32 product is cast to float, scaled by ``x_scale * weight_scale`` and
  the bias added.

The torch implementation below computes exactly that (the integer product in
float64, where it is exact), so the quality a search measures in torch is the
quality of the model ONNX Runtime runs. ``backends.onnx_translations`` maps the
op to the same ONNX nodes ``onnxruntime.quantization.quantize_dynamic`` writes,
which ONNX Runtime fuses into its VNNI/AMX kernel (``DynamicQuantizeMatMul``).
"""

from __future__ import annotations

import torch

OP_NAME = "tfcompile::linear_int8"


@torch.library.custom_op(OP_NAME, mutates_args=())
def linear_int8(x: torch.Tensor, weight_q: torch.Tensor, weight_zero_point: torch.Tensor,
                weight_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x_q, x_scale, x_zero_point = quantize_activation(x)
    accumulated = (x_q.double() - float(x_zero_point)) @ (weight_q.double() - weight_zero_point.double())
    return (accumulated.float() * (x_scale * weight_scale) + bias).to(x.dtype)


@linear_int8.register_fake
def _(x, weight_q, weight_zero_point, weight_scale, bias):
    return x.new_empty((*x.shape[:-1], weight_q.shape[1]))


LINEAR_INT8 = torch.ops.tfcompile.linear_int8.default


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX ``DynamicQuantizeLinear``: x as uint8 values (held in float), its fp32 scale and zero point."""
    x = x.float()
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    scale = (high - low) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero tensor: any scale is exact
    zero_point = torch.clamp(torch.round(-low / scale), 0, 255)
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 255), scale, zero_point


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear's ``[out, in]`` weight as int8 ``[in, out]``, its zero points (0) and per-column fp32 scales.

    Symmetric per output column, as ``quantize_dynamic(per_channel=True)`` writes it:
    a column's largest magnitude maps to 127.
    """
    weight = weight.detach().float()
    largest = weight.abs().amax(dim=1)
    scale = torch.where(largest > 0, largest / 127.0, torch.ones_like(largest))
    quantized = torch.clamp(torch.round(weight / scale[:, None]), -127, 127).to(torch.int8)
    return quantized.t().contiguous(), torch.zeros(weight.shape[0], dtype=torch.int8), scale


# How far two runtimes running the same graph may differ, relative to the output's largest magnitude
# (``verify.compare_outputs``'s measure), by the narrowest arithmetic in the graph. fp32: only summation
# order differs. tf32 and fp16: a 10-bit mantissa, unit roundoff 4.9e-4 per op, grown over a dozen
# layers. bf16: an 8-bit mantissa, roundoff 3.9e-3, three times fp16's margin (errors partly cancel).
# int8: the runtimes agree bit for bit until an fp32 difference upstream moves an activation across a
# rounding boundary, which moves that product by one of 255 levels, and later layers carry it on: on
# bert-base (12 layers, seeded) ONNX Runtime and torch differed by 1.9e-2 to 2.2e-2 at the worst output
# while their cosines with the fp32 model agreed to 1.5e-6.
RELATIVE_TOLERANCE = {"fp32": 1e-4, "tf32": 1e-2, "int8": 5e-2, "fp16": 1e-2, "bf16": 3e-2}


def graph_precision(graph) -> str:
    """The narrowest arithmetic a ModelGraph does: ``int8`` (a quantized linear), ``bf16``, ``fp16`` or ``fp32``."""
    if any(node.target is LINEAR_INT8 for node in graph.call_nodes()):
        return "int8"
    dtypes = {getattr(node.meta.get("val"), "dtype", None) for node in graph.gm.graph.nodes}
    if torch.bfloat16 in dtypes:
        return "bf16"
    return "fp16" if torch.float16 in dtypes else "fp32"
