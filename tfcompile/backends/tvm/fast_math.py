"""Vectorisable legalisations of exp, log, erf, tanh, sigmoid, GELU, SiLU and softmax for LLVM CPUs.

TVM's default legalisation calls libm's ``expf``/``erff``/``tanhf``, and
lowers ``sigmoid`` to ``1 / (1 + expf(-x))``; LLVM cannot vectorise those
calls, so every element of a GELU, a SiLU gate or a softmax becomes a scalar
call. Measured on this project's 2-core EPYC with tfcompile's schedules, the
GELU kernel of a GPT-2 layer (128 x 3072) took 1.8 ms (1.3 GFLOP/s) and a
softmax over 12 x 128 x 128 scores 0.7 ms, together about 15 % of GPT-2's
run time. TOPI's ``fast_exp``/``fast_erf``/``fast_tanh`` are polynomial and
rational approximations made of multiply-adds, which vectorise; sigmoid and
SiLU are built on ``fast_exp``.

TOPI has no fast log, and token merging's attention bias is one: ``log`` of
each key's merged size, [B, K], which FuseOps fuses into the add over the
[B, H, Q, K] scores, so ``logf`` ran once per score element (minilm b1 s512
``tome_r16`` ran 1.11x faster with the fast log, ``benchmarks/tvm_row_kernels.py
--before log``, session 22). ``_log`` splits the float into its
exponent and a mantissa m in [sqrt(1/2), sqrt(2)), and sums the series
log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, to the s^9 term
(truncation below 1e-9 relative), all integer and multiply-add operations.
Zero, negative, infinite, NaN and subnormal inputs get IEEE log's answers.
Vectorised, the fused kernel still computed the log once per score element
(12 x 496 times per key), so ``log`` is also marked opaque to FuseOps: it
runs as a kernel of its own over its [B, K] input, and the add reads the
result.

Exactness: on float32 inputs their relative error against float64 references
is at most 1.1e-6 (exp, |x| < 88), 3.7e-7 (erf), 3.1e-7 (tanh) and 2.1e-7 (log), the same
order as float rounding of the surrounding GEMMs and as the approximations
ORT's own CPU kernels use. ``fast_exp`` clamps its input to +-88.4, so
below about x = -88 the sigmoid comes out 0 instead of a subnormal float and
SiLU 0 instead of about -1e-37; ``tests/backends/test_tvm_fast_math.py``
bounds both over [-100, 100]: 1e-5 relative from -87 up, 1e-36 absolute below.
The backend still checks each compiled variant against torch
(1e-4 relative). Other dtypes keep TVM's default legalisation.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te, tirx, topi


def _is_float32(call) -> bool:
    info = getattr(call.args[0], "ty", None)
    return isinstance(info, relax.TensorType) and str(info.dtype) == "float32"


def tvm_legalization(bb: relax.BlockBuilder, call):
    """``call`` legalised as TVM itself would (its op's registered FLegalize)."""
    return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)


def _unary(name: str, fast):
    def legalize(bb: relax.BlockBuilder, call):
        if not _is_float32(call):
            return tvm_legalization(bb, call)
        return bb.call_te(fast, call.args[0], primfunc_name_hint=name)

    return legalize


def _gelu(x: te.Tensor) -> te.Tensor:
    half = tirx.const(0.5, x.dtype)
    return x * (half + topi.fast_erf(x * tirx.const(0.5**0.5, x.dtype)) * half)


def _gelu_tanh(x: te.Tensor) -> te.Tensor:
    inner = tirx.const(math.sqrt(2.0 / math.pi), x.dtype) * x * (1 + tirx.const(0.044715, x.dtype) * x * x)
    return tirx.const(0.5, x.dtype) * x * (tirx.const(1.0, x.dtype) + topi.fast_tanh(inner))


_LN2 = math.log(2.0)
_FLOAT_MIN_NORMAL = 1.1754943508222875e-38
_MANTISSA_BITS = 23


def _log_element(x: tirx.PrimExpr) -> tirx.PrimExpr:
    f32, i32 = "float32", "int32"
    subnormal = x < tirx.const(_FLOAT_MIN_NORMAL, f32)
    scaled = tirx.Select(subnormal, x * tirx.const(2.0**_MANTISSA_BITS, f32), x)
    bits = tirx.reinterpret(i32, scaled)
    exponent = ((bits >> _MANTISSA_BITS) & 0xFF) - 127 - tirx.Select(subnormal, tirx.const(_MANTISSA_BITS, i32),
                                                                    tirx.const(0, i32))
    mantissa = tirx.reinterpret(f32, (bits & 0x7FFFFF) | 0x3F800000)  # in [1, 2)
    high = mantissa > tirx.const(math.sqrt(2.0), f32)
    mantissa = tirx.Select(high, mantissa * tirx.const(0.5, f32), mantissa)
    exponent = exponent + tirx.Select(high, tirx.const(1, i32), tirx.const(0, i32))
    s = (mantissa - tirx.const(1.0, f32)) / (mantissa + tirx.const(1.0, f32))
    s2 = s * s
    series = tirx.const(1.0 / 9.0, f32)
    for odd in (7.0, 5.0, 3.0, 1.0):
        series = series * s2 + tirx.const(1.0 / odd, f32)
    value = exponent.astype(f32) * tirx.const(_LN2, f32) + tirx.const(2.0, f32) * s * series
    inf = tirx.const(float("inf"), f32)
    value = tirx.Select(x == inf, inf, value)
    value = tirx.Select(x == tirx.const(0.0, f32), -inf, value)
    return tirx.Select(x < tirx.const(0.0, f32), tirx.const(float("nan"), f32), tirx.Select(tirx.isnan(x), x, value))


def _log(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: _log_element(x(*i)), name="log")


# TVM's OpPatternKind: kOpaque, which FuseOps fuses with nothing.
OPAQUE = 8


def kernel_alone(bb: relax.BlockBuilder, result: relax.Call, *, scheduled: bool = False) -> relax.Call:
    """``result`` (a ``call_te``'s call) with its kernel opaque to FuseOps; ``scheduled``: also left alone by
    the schedule rules, its loops as written being its schedule."""
    kernel = result.args[0]
    attrs = {"op_pattern": OPAQUE, **({"tirx.is_scheduled": True} if scheduled else {})}
    bb.update_func(kernel, bb.get()[kernel].with_attrs(attrs))
    return result


def _log_alone(bb: relax.BlockBuilder, call):
    if not _is_float32(call):
        return tvm_legalization(bb, call)
    return kernel_alone(bb, bb.call_te(_log, call.args[0], primfunc_name_hint="log"))


def _sigmoid(x: te.Tensor) -> te.Tensor:
    one = tirx.const(1.0, x.dtype)
    return one / (one + topi.fast_exp(-x))


def _silu(x: te.Tensor) -> te.Tensor:
    return x * _sigmoid(x)


def _softmax(bb: relax.BlockBuilder, call):
    if not _is_float32(call):
        return tvm_legalization(bb, call)
    return bb.call_te(topi.nn.fast_softmax, call.args[0], call.attrs.axis, primfunc_name_hint="softmax")


def _power(bb: relax.BlockBuilder, call):
    """``x ** 2`` and ``x ** 3`` (GPT-2's GELU) as multiplies instead of scalar ``powf`` calls."""
    exponent = call.args[1]
    if isinstance(exponent, relax.Var):
        exponent = bb.lookup_binding(exponent) or exponent
    value = getattr(exponent, "value", None)
    if not _is_float32(call) or value is None or value.numpy().size != 1:
        return tvm_legalization(bb, call)
    power = float(value.numpy().reshape(()))
    if power not in (2.0, 3.0):
        return tvm_legalization(bb, call)

    def square(x: te.Tensor) -> te.Tensor:
        return te.compute(x.shape, lambda *i: x(*i) * x(*i), name="power")

    def cube(x: te.Tensor) -> te.Tensor:
        return te.compute(x.shape, lambda *i: x(*i) * x(*i) * x(*i), name="power")

    return bb.call_te(cube if power == 3.0 else square, call.args[0], primfunc_name_hint="power")


def legalize_map() -> dict:
    """Op name -> legaliser for ``relax.transform.LegalizeOps(customize_legalize_map=...)``."""
    return {
        "relax.exp": _unary("exp", topi.fast_exp),
        "relax.log": _log_alone,
        "relax.erf": _unary("erf", topi.fast_erf),
        "relax.tanh": _unary("tanh", topi.fast_tanh),
        "relax.sigmoid": _unary("sigmoid", _sigmoid),
        "relax.nn.gelu": _unary("gelu", _gelu),
        "relax.nn.silu": _unary("silu", _silu),
        "relax.nn.gelu_tanh": _unary("gelu_tanh", _gelu_tanh),
        "relax.nn.softmax": _softmax,
        "relax.power": _power,
    }
