"""Torch implementations of ONNX layer operators: normalizations, Gemm, Conv, pooling.

Registered into ``onnx_ops.OPS`` on import (``onnx_import`` imports this
module); see :mod:`tfcompile.frontend.onnx_ops` for the handler contract.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from tfcompile.frontend.onnx_ops import OPS, OpSpec, normalize_axis, op, torch_pads


@op("LayerNormalization")
def _layer_norm(n, x, scale, bias=None):
    axis, eps = normalize_axis(n.get("axis", -1), x.dim()), n.get("epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    if not (n.wants(1) or n.wants(2)):
        return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape), eps)
    dims = tuple(range(axis, x.dim()))
    xf = x.float() if n.get("stash_type", 1) == 1 else x
    mean = xf.mean(dims, keepdim=True)
    inv_std = torch.rsqrt(((xf - mean) ** 2).mean(dims, keepdim=True) + eps)
    y = ((xf - mean) * inv_std).to(x.dtype) * scale
    return (y if bias is None else y + bias), mean, inv_std


@op("RMSNormalization")
def _rms_norm(n, x, scale):
    axis, eps = normalize_axis(n.get("axis", -1), x.dim()), n.get("epsilon", 1e-5)
    xf = x.float() if n.get("stash_type", 1) == 1 else x
    ms = (xf * xf).mean(tuple(range(axis, x.dim())), keepdim=True)
    return (xf * torch.rsqrt(ms + eps)).to(x.dtype) * scale


@op("BatchNormalization")
def _batch_norm(n, x, scale, bias, mean, var):
    if n.get("training_mode", 0):
        raise NotImplementedError("BatchNormalization in training mode")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, n.get("epsilon", 1e-5))


# -- linear algebra, convolution, pooling ---------------------------------------

@op("Gemm")
def _gemm(n, a, b, c=None):
    alpha, beta = n.get("alpha", 1.0), n.get("beta", 1.0)
    a = a.t() if n.get("transA", 0) else a
    if alpha == 1 and beta == 1:
        # The forms torch itself lowers to Gemm: linear (transB) and addmm.
        if n.get("transB", 0) and (c is None or c.dim() == 1):
            return F.linear(a, b, c)
        b = b.t() if n.get("transB", 0) else b
        return a @ b if c is None else torch.addmm(c, a, b)
    out = (a @ (b.t() if n.get("transB", 0) else b)) * alpha
    return out if c is None else out + c * beta


def _window_pads(n, in_sizes, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    k = len(kernel)
    auto = n.get("auto_pad", "NOTSET")
    if auto == "VALID":
        return [0] * k, [0] * k
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((-(-i // s) - 1) * s + (kk - 1) * d + 1 - i, 0)
                 for i, kk, s, d in zip(in_sizes, kernel, strides, dilations)]
        small, big = [t // 2 for t in total], [t - t // 2 for t in total]
        return (small, big) if auto == "SAME_UPPER" else (big, small)
    pads = n.get("pads", [0] * 2 * k)
    return list(pads[:k]), list(pads[k:])


@op("Conv")
def _conv(n, x, w, b=None):
    k = w.dim() - 2
    strides, dilations = n.get("strides", [1] * k), n.get("dilations", [1] * k)
    begin, end = _window_pads(n, x.shape[2:], n.get("kernel_shape", w.shape[2:]), strides, dilations)
    if begin != end:  # torch convs only pad symmetrically
        x, begin = F.pad(x, torch_pads(begin, end)), [0] * k
    conv = (F.conv1d, F.conv2d, F.conv3d)[k - 1]
    return conv(x, w, b, strides, begin, dilations, n.get("group", 1))


def _pool(kind: str) -> Callable:
    def impl(n, x):
        kernel = n.get("kernel_shape")
        k = len(kernel)
        strides, dilations = n.get("strides", [1] * k), n.get("dilations", [1] * k)
        begin, end = _window_pads(n, x.shape[2:], kernel, strides, dilations)
        if begin != end or n.wants(1):
            raise NotImplementedError(f"{n.op_type} with asymmetric pads or an Indices output")
        ceil = bool(n.get("ceil_mode", 0))
        if kind == "max":
            pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[k - 1]
            return pool(x, kernel, strides, begin, dilations, ceil)
        if any(d != 1 for d in dilations):
            raise NotImplementedError("AveragePool with dilations")
        return (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[k - 1](
            x, kernel, strides, begin, ceil, bool(n.get("count_include_pad", 0)))
    return impl


OPS["MaxPool"], OPS["AveragePool"] = OpSpec(_pool("max")), OpSpec(_pool("avg"))
