"""Torch implementations of ONNX operators, used by :mod:`tfcompile.frontend.onnx_import`.

``OPS`` maps an op type of the default ONNX domain to an :class:`OpSpec`. A
handler has the signature ``fn(node, *inputs)`` and returns a tensor or a tuple
of tensors, one per node output. ``node`` (an ``OnnxNode`` of the importer)
carries the parsed attributes and the opset of the default domain, so each
handler applies the attribute defaults of the opset the model was written for.

The importer decides how each input reaches the handler, from the ``OpSpec``:

* ``static`` positions (shapes, axes, slice bounds, pads, ...) must be known at
  conversion time and reach ``forward`` as Python lists/numbers; this is what
  keeps the traced graph static (and free of tensor reads, for strict export);
* a constant with one element at a ``scalars`` position is a Python number, so
  ``x * 0.125`` stays a scalar op in the traced graph rather than a buffer;
* anything else is a tensor, and ``None`` stands for an omitted optional input.

Every handler runs on CPU tensors (constant folding, where static inputs are
tensors too), on meta tensors (shape propagation at conversion time) and inside
``forward`` under torch.export, so handlers read only static shapes, static
inputs and attributes, never the data of a runtime tensor.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import onnx
import torch
import torch.nn.functional as F

from tfcompile.errors import ModelLoadError

_T = onnx.TensorProto
DTYPES: dict[int, torch.dtype] = {
    _T.FLOAT: torch.float32, _T.DOUBLE: torch.float64, _T.FLOAT16: torch.float16,
    _T.BFLOAT16: torch.bfloat16, _T.INT8: torch.int8, _T.INT16: torch.int16,
    _T.INT32: torch.int32, _T.INT64: torch.int64, _T.UINT8: torch.uint8, _T.BOOL: torch.bool,
}


def torch_dtype(elem_type: int, what: str) -> torch.dtype:
    if elem_type not in DTYPES:
        name = _T.DataType.Name(elem_type) if elem_type in _T.DataType.values() else elem_type
        raise ModelLoadError(f"{what}: unsupported ONNX element type {name}")
    return DTYPES[elem_type]


@dataclass(frozen=True)
class OpSpec:
    fn: Callable[..., Any]
    static: tuple[int, ...] = ()  # inputs that must be conversion-time constants
    scalars: tuple[int, ...] = ()  # inputs that may become Python numbers
    dtype_from: tuple[int, ...] = (0,)  # inputs giving the output dtype: one stays a tensor
    elementwise: bool = False  # broadcasting op: a size-1 constant of lower rank is a scalar


OPS: dict[str, OpSpec] = {}


def op(*names: str, **spec: Any) -> Callable:
    def register(fn: Callable) -> Callable:
        for name in names:
            OPS[name] = OpSpec(fn, **spec)
        return fn
    return register


def _flat(a: Any) -> list[Any]:
    # A static input: a tensor while folding, a (nested) list or number in forward.
    if isinstance(a, torch.Tensor):
        return a.reshape(-1).tolist()
    return [v for x in a for v in _flat(x)] if isinstance(a, (list, tuple)) else [a]


def _ints(a: Any) -> list[int]:
    return [int(v) for v in _flat(a)]


def _scalar(a: Any) -> Any:
    return _flat(a)[0]


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def torch_pads(begin: list[int], end: list[int]) -> list[int]:
    # F.pad lists (begin, end) pairs starting from the last dimension.
    return [p for i in reversed(range(len(begin))) for p in (begin[i], end[i])]


def _to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)  # a no-op cast would still be traced


# -- elementwise ----------------------------------------------------------------

_UNARY: dict[str, Callable] = {
    "Abs": torch.abs, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal, "Erf": torch.erf, "Tanh": torch.tanh, "Sigmoid": torch.sigmoid,
    "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos,
    "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh, "Floor": torch.floor,
    "Ceil": torch.ceil, "Round": torch.round, "Relu": torch.relu, "Sign": torch.sign,
    "Not": torch.logical_not, "IsNaN": torch.isnan, "Softplus": F.softplus, "Softsign": F.softsign,
    "Mish": F.mish, "HardSwish": F.hardswish, "Identity": lambda x: x,
}
for _name, _f in _UNARY.items():
    OPS[_name] = OpSpec(lambda n, x, _f=_f: _f(x))

# Python operators rather than torch functions: they accept a scalar on either side.
_BINARY: dict[str, Callable] = {
    "Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Equal": operator.eq,
    "Less": operator.lt, "LessOrEqual": operator.le, "Greater": operator.gt,
    "GreaterOrEqual": operator.ge, "And": operator.and_, "Or": operator.or_, "Xor": operator.xor,
    "BitwiseAnd": operator.and_, "BitwiseOr": operator.or_, "BitwiseXor": operator.xor,
}
for _name, _f in _BINARY.items():
    OPS[_name] = OpSpec(lambda n, a, b, _f=_f: _f(a, b), scalars=(0, 1), dtype_from=(0, 1),
                        elementwise=True)

_VARIADIC: dict[str, Callable] = {"Max": torch.maximum, "Min": torch.minimum, "Sum": operator.add}
for _name, _f in _VARIADIC.items():
    OPS[_name] = OpSpec(lambda n, *xs, _f=_f: functools.reduce(_f, xs))
OPS["Mean"] = OpSpec(lambda n, *xs: functools.reduce(operator.add, xs) / len(xs))


# -- one-liners (attribute defaults as in the ONNX spec) --------------------------

_SIMPLE: dict[str, tuple[Callable, dict[str, Any]]] = {
    "Where": (lambda n, c, a, b: torch.where(c, a, b),
              dict(scalars=(1, 2), dtype_from=(1, 2), elementwise=True)),
    # ONNX Pow has the base's type whatever the exponent's.
    "Pow": (lambda n, a, b: _to(torch.pow(a, b), a.dtype), dict(scalars=(1,), elementwise=True)),
    "Mod": (lambda n, a, b: torch.fmod(a, b) if n.get("fmod", 0) else torch.remainder(a, b),
            dict(scalars=(1,), elementwise=True)),
    "Cast": (lambda n, x: _to(x, torch_dtype(n.get("to"), f"Cast node {n.name!r}")), {}),
    "CastLike": (lambda n, x, like: _to(x, like.dtype), {}),
    "LeakyRelu": (lambda n, x: F.leaky_relu(x, n.get("alpha", 0.01)), {}),
    "Elu": (lambda n, x: F.elu(x, n.get("alpha", 1.0)), {}),
    "Celu": (lambda n, x: F.celu(x, n.get("alpha", 1.0)), {}),
    "Selu": (lambda n, x: n.get("gamma", 1.05070102214813232421875) * torch.where(
        x > 0, x, n.get("alpha", 1.67326319217681884765625) * (torch.exp(x) - 1)), {}),
    "HardSigmoid": (lambda n, x: torch.clamp(n.get("alpha", 0.2) * x + n.get("beta", 0.5), 0, 1), {}),
    "ThresholdedRelu": (lambda n, x: torch.where(x > n.get("alpha", 1.0), x, 0.0), {}),
    "PRelu": (lambda n, x, slope: torch.where(x < 0, x * slope, x), {}),
    "Gelu": (lambda n, x: F.gelu(x, approximate=n.get("approximate", "none")), {}),
    # Shapes are static, so Shape and Size are constants even of runtime values.
    "Shape": (lambda n, x: torch.tensor(list(x.shape)[n.get("start", 0):n.get("end")], dtype=torch.int64,
                                        device="cpu"), {}),
    "Size": (lambda n, x: torch.tensor(x.numel(), dtype=torch.int64, device="cpu"), {}),
    "Transpose": (lambda n, x: x.permute(n.get("perm", list(reversed(range(x.dim()))))), {}),
    "Concat": (lambda n, *xs: torch.cat(xs, dim=n.get("axis")), {}),
    # ONNX Expand broadcasts both ways: a 1 in `shape` keeps the input's dim.
    "Expand": (lambda n, x, shape: x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))),
               dict(static=(1,))),
    "Tile": (lambda n, x, repeats: x.repeat(_ints(repeats)), dict(static=(1,))),
    "Trilu": (lambda n, x, k=None: (torch.triu if n.get("upper", 1) else torch.tril)(
        x, _scalar(k) if k is not None else 0), dict(static=(1,))),
    "Dropout": (lambda n, x, *_: (x, torch.ones_like(x, dtype=torch.bool)) if n.wants(1) else x, {}),
    "MatMul": (lambda n, a, b: torch.matmul(a, b), {}),
    "Einsum": (lambda n, *xs: torch.einsum(n.get("equation"), *xs), {}),
    "GlobalAveragePool": (lambda n, x: x.mean(tuple(range(2, x.dim())), keepdim=True), {}),
    "GlobalMaxPool": (lambda n, x: x.amax(tuple(range(2, x.dim())), keepdim=True), {}),
}
for _name, (_f, _spec) in _SIMPLE.items():
    OPS[_name] = OpSpec(_f, **_spec)


@op("Div", scalars=(1,), elementwise=True)
def _div(n, a, b):
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX (and ORT) integer division truncates


@op("Clip", scalars=(1, 2))
def _clip(n, x, lo=None, hi=None):
    if n.opset < 11:
        lo, hi = n.get("min"), n.get("max")
    return x if lo is None and hi is None else torch.clamp(x, lo, hi)


@op("IsInf")
def _isinf(n, x):
    out = torch.isinf(x)
    if not n.get("detect_positive", 1):
        out = out & (x < 0)
    if not n.get("detect_negative", 1):
        out = out & (x > 0)
    return out


# -- shapes and indexing ---------------------------------------------------------

@op("Constant")
def _constant(n):
    for key, dtype in (("value", None), ("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in n.attrs:
            return n.attrs[key] if dtype is None else torch.tensor(n.attrs[key], dtype=dtype)
    raise NotImplementedError(f"Constant with attribute(s) {sorted(n.attrs)}")


@op("ConstantOfShape", static=(0,))
def _constant_of_shape(n, shape):
    value = n.get("value")
    if value is None:
        return torch.zeros(_ints(shape), dtype=torch.float32)
    return torch.full(_ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype)


@op("Range", static=(0, 1, 2))
def _range(n, start, limit, delta):
    # Only static inputs, so this always runs while folding, on tensors.
    return torch.arange(_scalar(start), _scalar(limit), _scalar(delta), dtype=start.dtype)


@op("Reshape", static=(1,))
def _reshape(n, x, shape=None):
    shape = _ints(n.get("shape") if shape is None else shape)
    if not n.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]  # 0 copies the input dim
    return x.reshape(shape)


@op("Flatten")
def _flatten(n, x):
    axis = normalize_axis(n.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Squeeze", static=(1,))
def _squeeze(n, x, axes=None):
    axes = _ints(n.get("axes", []) if axes is None else axes)
    return x.squeeze(tuple(normalize_axis(a, x.dim()) for a in axes)) if axes else x.squeeze()


@op("Unsqueeze", static=(1,))
def _unsqueeze(n, x, axes=None):
    axes = _ints(n.get("axes") if axes is None else axes)
    rank = x.dim() + len(axes)  # axes index the output
    for a in sorted(normalize_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


@op("Split", static=(1,))
def _split(n, x, split=None):
    axis = normalize_axis(n.get("axis", 0), x.dim())
    sizes = _ints(split) if split is not None else n.get("split")
    if not sizes:  # equal parts; since opset 18 the last one may be smaller
        sizes = -(-x.shape[axis] // n.get("num_outputs", len(n.outputs)))
    return tuple(torch.split(x, sizes, dim=axis))


@op("Slice", static=(1, 2, 3, 4))
def _slice(n, x, starts=None, ends=None, axes=None, steps=None):
    if starts is None:  # opset < 10: bounds are attributes
        starts, ends, axes = n.get("starts"), n.get("ends"), n.get("axes")
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index, flips = [slice(None)] * x.dim(), []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = normalize_axis(axis, x.dim())
        dim = x.shape[axis]
        start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:  # torch has no negative steps: slice the flipped axis instead
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            start, end, step = dim - 1 - start, dim - 1 - end, -step
            flips.append(axis)
        index[axis] = slice(start, end, step)
    return (x.flip(flips) if flips else x)[tuple(index)]


@op("Gather", scalars=(1,))
def _gather(n, x, idx):
    axis = normalize_axis(n.get("axis", 0), x.dim())
    if isinstance(idx, int):
        return x.select(axis, idx)
    if axis == 0 and x.dim() == 2 and n.input_kinds[:2] == ("weight", "runtime"):
        # A token embedding: keep the pattern recognisable. (Ids are never negative,
        # which F.embedding, unlike Gather, would reject.)
        return F.embedding(idx, x)
    return x[(slice(None),) * axis + (idx,)]


@op("GatherElements")
def _gather_elements(n, x, idx):
    axis = normalize_axis(n.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)  # torch.gather rejects negative indices
    return torch.gather(x, axis, idx.long())


@op("GatherND")
def _gather_nd(n, x, idx):
    b, k = n.get("batch_dims", 0), idx.shape[-1]
    if b == 0:
        return x[tuple(idx[..., j] for j in range(k))]
    lead, nb = x.shape[:b], math.prod(x.shape[:b])
    x, idx = x.reshape(nb, *x.shape[b:]), idx.reshape(nb, *idx.shape[b:])
    batch = torch.arange(nb).reshape(nb, *[1] * (idx.dim() - 2))
    out = x[(batch, *(idx[..., j] for j in range(k)))]
    return out.reshape(*lead, *out.shape[1:])


@op("ScatterND")
def _scatter_nd(n, x, idx, updates):
    reduction = n.get("reduction", "none")
    if reduction not in ("none", "add"):
        raise NotImplementedError(f"ScatterND reduction={reduction!r}")
    index = tuple(idx[..., j] for j in range(idx.shape[-1]))
    return x.index_put(index, updates, accumulate=reduction == "add")


@op("Pad", static=(1, 2, 3))
def _pad(n, x, pads=None, value=None, axes=None):
    if n.opset < 11:
        pads, value = n.get("pads"), n.get("value", 0.0)
    pads = _ints(pads)
    axes = [normalize_axis(a, x.dim()) for a in _ints(axes)] if axes is not None else list(range(x.dim()))
    begin, end = [0] * x.dim(), [0] * x.dim()
    for a, p0, p1 in zip(axes, pads[:len(axes)], pads[len(axes):]):
        begin[a], end[a] = p0, p1
    widths = torch_pads(begin, end)
    while widths[-2:] == [0, 0]:  # non-constant modes only pad trailing dims
        del widths[-2:]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}[
        n.get("mode", "constant")]
    if mode != "constant":
        return F.pad(x, widths, mode=mode)
    return F.pad(x, widths, value=_scalar(value) if value is not None else 0)


@op("CumSum", static=(1,))
def _cumsum(n, x, axis):
    axis = normalize_axis(_scalar(axis), x.dim())
    reverse = n.get("reverse", 0)
    src = x.flip(axis) if reverse else x
    out = _to(torch.cumsum(src, axis), x.dtype)  # torch sums int32 into int64
    if n.get("exclusive", 0):
        out = out - src
    return out.flip(axis) if reverse else out


@op("TopK", static=(1,))
def _topk(n, x, k=None):
    k = _scalar(k) if k is not None else n.get("k")
    return tuple(torch.topk(x, k, dim=n.get("axis", -1), largest=bool(n.get("largest", 1))))


def _arg(f: Callable) -> Callable:
    def impl(n, x):
        axis, keep = normalize_axis(n.get("axis", 0), x.dim()), bool(n.get("keepdims", 1))
        if n.get("select_last_index", 0):
            return x.shape[axis] - 1 - f(x.flip(axis), axis, keepdim=keep)
        return f(x, axis, keepdim=keep)
    return impl


OPS["ArgMax"], OPS["ArgMin"] = OpSpec(_arg(torch.argmax)), OpSpec(_arg(torch.argmin))


# -- reductions and normalisation -----------------------------------------------

def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(d, keepdim=True)
    return x if keep else x.squeeze(tuple(dims))


_REDUCE: dict[str, Callable] = {
    "ReduceSum": lambda x, d, k: torch.sum(x, d, keepdim=k),
    "ReduceMean": lambda x, d, k: torch.mean(x, d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, d, keepdim=k),
    "ReduceL1": lambda x, d, k: torch.sum(x.abs(), d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def _reduce(f: Callable) -> Callable:
    def impl(n, x, axes=None):
        if axes is None:  # an attribute before opset 13 (ReduceSum) / 18 (the others)
            axes = n.get("axes")
        axes = _ints(axes) if axes is not None else []
        if not axes:
            if n.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        out = f(x, [normalize_axis(a, x.dim()) for a in axes], bool(n.get("keepdims", 1)))
        return _to(out, x.dtype)  # torch widens integer sums
    return impl


for _name, _f in _REDUCE.items():
    OPS[_name] = OpSpec(_reduce(_f), static=(1,))


def _softmax_like(f: Callable) -> Callable:
    def impl(n, x):
        if n.opset >= 13:
            return f(x, dim=n.get("axis", -1))
        # Before opset 13 the input is coerced to 2-D around `axis` (default 1).
        axis = normalize_axis(n.get("axis", 1), x.dim())
        return f(x.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)
    return impl


OPS["Softmax"], OPS["LogSoftmax"] = OpSpec(_softmax_like(F.softmax)), OpSpec(_softmax_like(F.log_softmax))
