"""Import an ONNX model as a ``torch.nn.Module`` that torch.export traces with static shapes.

This is how tfcompile accepts a user's ``.onnx`` file: it becomes a torch module,
which is then traced to the project's one IR like any other model.

Approach:

1. Validate the model (``onnx.checker``), inline model-local functions, and
   reject every op without a handler in one error listing them all.
2. Give every graph input a concrete shape: ``input_shapes[name]`` when given,
   else ``batch`` for a symbolic axis 0 and ``seq`` for other symbolic axes.
3. Walk the (topologically sorted) nodes once, running each through its torch
   handler from :mod:`tfcompile.frontend.onnx_ops`:

   * a node whose inputs are all known is evaluated on CPU and its outputs
     become constants. With the input shapes fixed, ``Shape`` of any value is
     known, so shape arithmetic (Shape/Gather/Concat/Range/ConstantOfShape/...)
     folds away here, and so do the masks and tables built from it;
   * any other node is evaluated on meta tensors, which gives its output shapes
     and dtypes without computing anything, and becomes a *step* of ``forward``.
     Inputs an op needs as Python values (Reshape's shape, Slice's bounds, ...)
     must be constants by now, else the model has data-dependent shapes.

   Folding with the same torch code that later runs in ``forward`` means there
   is no second implementation of ONNX semantics to keep in sync.
4. ``forward`` replays the steps; torch.export traces them into an FX graph.
   Float initializers become parameters (``requires_grad=False``); constants
   that a step reads as tensors become buffers; single-element constants of
   broadcasting ops become Python scalars.

Limits: no control flow (If/Loop/Scan), no sequence/map/optional values, no
ops outside the default domain (``com.microsoft`` contrib ops), no ops with
data-dependent output shapes (NonZero, Unique, ...), no shape that depends on
input values, no string/float8 tensors or sparse initializers. Float
initializers with one element are treated as constants, not parameters. A
Gather of runtime ids from a 2-D float initializer becomes ``F.embedding``,
which (unlike ONNX Gather) rejects negative ids. Models over 2 GB in memory
skip ``onnx.checker`` (protobuf cannot serialise them for it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from tfcompile.errors import ModelLoadError, ShapeError, TfcompileError
from tfcompile.frontend.inputs import make_input, seeded_generator
from tfcompile.frontend import onnx_layer_ops  # noqa: F401  (registers Gemm, Conv, norms, pools)
from tfcompile.frontend.onnx_ops import OPS, OpSpec, torch_dtype

_DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops through which an integer input still holds token ids on its way to an embedding.
_ID_PASSTHROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}

# How forward obtains an argument: ("env", name) a model input or step output,
# ("attr", attr) a parameter/buffer of the module, ("lit", value) a Python value.
Ref = tuple[str, Any]


def tensor_from_proto(t: onnx.TensorProto) -> torch.Tensor:
    torch_dtype(t.data_type, f"tensor {t.name!r}")
    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:  # typically external data that was not loaded with the model
        raise ModelLoadError(f"tensor {t.name!r} could not be read: {_one_line(e)}") from e
    if t.data_type == onnx.TensorProto.BFLOAT16:
        # numpy has no bfloat16 (onnx returns an ml_dtypes array): move the raw bits.
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(arr, copy=True))


def _attr_value(a: onnx.AttributeProto) -> Any:
    v = onnx.helper.get_attribute_value(a)
    if a.type == onnx.AttributeProto.STRING:
        return v.decode()
    if a.type == onnx.AttributeProto.STRINGS:
        return [s.decode() for s in v]
    if a.type == onnx.AttributeProto.TENSOR:
        return tensor_from_proto(v)
    return v


class OnnxNode:
    """What a handler needs from a NodeProto: attributes, opset, outputs."""

    def __init__(self, proto: onnx.NodeProto, opset: int, input_kinds: tuple[str, ...] = ()):
        self.op_type = proto.op_type
        self.name = proto.name or (proto.output[0] if proto.output else "?")
        self.opset = opset
        self.attrs = {a.name: _attr_value(a) for a in proto.attribute}
        self.outputs = tuple(proto.output)
        # Per input: "weight" (float initializer), "const" (known at conversion time),
        # "runtime" (depends on the model inputs) or "" (omitted).
        self.input_kinds = input_kinds

    def get(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def wants(self, i: int) -> bool:
        return i < len(self.outputs) and self.outputs[i] != ""


@dataclass
class ImportedOnnx:
    module: torch.nn.Module  # forward(*tensors) -> tuple[torch.Tensor, ...]
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]


@dataclass(frozen=True)
class _Step:
    fn: Callable[..., Any]
    node: OnnxNode
    args: tuple[Ref, ...]
    outputs: tuple[str, ...]


class OnnxGraphModule(nn.Module):
    """Replays the non-constant part of an ONNX graph with torch ops."""

    def __init__(self, input_names: list[str], steps: list[_Step], outputs: list[Ref],
                 params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]):
        super().__init__()
        for attr, t in params.items():
            self.register_parameter(attr, nn.Parameter(t, requires_grad=False))
        for attr, t in buffers.items():
            self.register_buffer(attr, t)
        self._input_names = list(input_names)
        self._steps = list(steps)
        self._outputs = list(outputs)

    def _resolve(self, env: dict[str, torch.Tensor], ref: Ref) -> Any:
        kind, value = ref
        if kind == "env":
            return env[value]
        return getattr(self, value) if kind == "attr" else value

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self._input_names):
            raise TypeError(f"expected {len(self._input_names)} inputs ({', '.join(self._input_names)}), "
                            f"got {len(inputs)}")
        env = dict(zip(self._input_names, inputs))
        for step in self._steps:
            outs = step.fn(step.node, *(self._resolve(env, r) for r in step.args))
            outs = (outs,) if isinstance(outs, torch.Tensor) else outs
            env.update((name, out) for name, out in zip(step.outputs, outs) if name)
        return tuple(self._resolve(env, r) for r in self._outputs)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


def _validate(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        # The checker works on the serialised model, which protobuf caps at 2 GB.
        if model.ByteSize() <= onnx.checker.MAXIMUM_PROTOBUF:
            onnx.checker.check_model(model)
    except Exception as e:
        raise ModelLoadError(f"invalid ONNX model: {_one_line(e)}") from e
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    unsupported = sorted({_op_key(n) for n in model.graph.node if _op_key(n) not in OPS})
    if unsupported:
        raise ModelLoadError(f"unsupported ONNX op(s): {', '.join(unsupported)}")
    if model.graph.sparse_initializer:
        raise ModelLoadError("ONNX models with sparse initializers are not supported")
    return model


def _input_shape(inp: onnx.ValueInfoProto, given: tuple[int, ...] | None,
                 batch: int, seq: int) -> tuple[int, ...]:
    tt = inp.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    if given is None:
        if not tt.HasField("shape"):
            raise ShapeError(f"input {inp.name!r} has no shape in the model; pass it in input_shapes")
        shape = tuple(d if d is not None else (batch if i == 0 else seq) for i, d in enumerate(dims))
    else:
        shape = tuple(int(d) for d in given)
        if tt.HasField("shape") and len(shape) != len(dims):
            expected = "x".join("?" if d is None else str(d) for d in dims)
            raise ShapeError(f"input {inp.name!r}: shape {shape} has rank {len(shape)}, the model expects "
                             f"rank {len(dims)} ({expected})")
        for i, (d, g) in enumerate(zip(dims, shape)):
            if d is not None and d != g:
                raise ShapeError(f"input {inp.name!r}: axis {i} is fixed to {d} in the model, got {g}")
    if any(d <= 0 for d in shape):
        raise ShapeError(f"input {inp.name!r}: every dimension must be positive, got {shape}")
    return shape


def _embedding_sizes(graph: onnx.GraphProto, tables: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Input name -> rows of the smallest initializer table it indexes through Gather."""
    producer = {out: n for n in graph.node for out in n.output}
    sizes: dict[str, int] = {}
    for n in graph.node:
        if n.op_type != "Gather" or len(n.input) < 2 or n.input[0] not in tables:
            continue
        table = tables[n.input[0]]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        v = n.input[1]
        while v in producer and producer[v].op_type in _ID_PASSTHROUGH:
            v = producer[v].input[0]
        if v not in producer and -len(table) <= axis < len(table):
            sizes[v] = min(sizes.get(v, table[axis]), table[axis])
    return sizes


def _attr_name(name: str, taken: set[str], prefix: str = "") -> str:
    base = prefix + (re.sub(r"\W", "_", name).strip("_") or "tensor")
    base = "_" + base if base[0].isdigit() else base
    attr, i = base, 1
    while attr in taken or hasattr(OnnxGraphModule, attr):
        attr, i = f"{base}_{i}", i + 1
    taken.add(attr)
    return attr


class _Converter:
    """One pass over the graph: folds constants, records the runtime steps."""

    def __init__(self, opset: int):
        self.opset = opset
        self.consts: dict[str, torch.Tensor] = {}  # known at conversion time (CPU)
        self.weights: dict[str, torch.Tensor] = {}  # float initializers -> parameters
        self.metas: dict[str, torch.Tensor] = {}  # runtime values, as meta tensors
        self.attrs: dict[str, str] = {}  # onnx name -> module attribute
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.steps: list[_Step] = []

    def add_initializer(self, name: str, t: torch.Tensor) -> None:
        # One-element floats are constants (eps, scales, fill values) in exported graphs.
        if t.is_floating_point() and t.numel() > 1:
            self.weights[name] = t
            self.metas[name] = torch.empty(t.shape, dtype=t.dtype, device="meta")
        else:
            self.consts[name] = t

    def ref(self, name: str) -> Ref:
        if name not in self.weights and name not in self.consts:
            return ("env", name)
        if name not in self.attrs:
            taken = set(self.params) | set(self.buffers)
            if name in self.weights:
                self.attrs[name] = attr = _attr_name(name, taken)
                self.params[attr] = self.weights[name]
            else:
                self.attrs[name] = attr = _attr_name(name, taken, prefix="const_")
                # A copy: folded constants may be views of one another, and aliased
                # buffers are a needless complication for torch.export.
                self.buffers[attr] = self.consts[name].clone()
        return ("attr", self.attrs[name])

    def _call(self, spec: OpSpec, node: OnnxNode, args: list[Any]) -> tuple[torch.Tensor, ...]:
        try:
            outs = spec.fn(node, *args)
        except TfcompileError:
            raise
        except Exception as e:
            raise ModelLoadError(
                f"cannot convert ONNX node {node.name!r} ({node.op_type}): {_one_line(e)}") from e
        return (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)

    def _scalar_positions(self, spec: OpSpec, names: list[str]) -> set[int]:
        def rank(i: int) -> int:
            return (self.consts.get(names[i]) if names[i] in self.consts else self.metas[names[i]]).dim()

        present = [i for i, nm in enumerate(names) if nm]
        chosen = set()
        for i in spec.scalars:
            c = self.consts.get(names[i]) if i < len(names) and names[i] else None
            if c is None or c.numel() != 1:
                continue
            others = [rank(j) for j in present if j != i and j not in spec.static]
            # A size-1 constant broadcasts away unless it has more dims than the other operands.
            if c.dim() == 0 or (spec.elementwise and c.dim() <= max(others, default=0)):
                chosen.add(i)
        dtype_inputs = [i for i in spec.dtype_from if i in present]
        if dtype_inputs and all(i in chosen for i in dtype_inputs):
            chosen.discard(dtype_inputs[-1])  # a tensor must carry the output dtype
        return chosen

    def convert(self, proto: onnx.NodeProto) -> None:
        spec = OPS[_op_key(proto)]
        names = list(proto.input)
        kinds = tuple("" if not nm else "weight" if nm in self.weights else "const" if nm in self.consts
                      else "runtime" for nm in names)
        node = OnnxNode(proto, self.opset, kinds)
        for nm in names:
            if nm and nm not in self.consts and nm not in self.metas:
                raise ModelLoadError(f"ONNX node {node.name!r} ({node.op_type}) reads undefined value {nm!r}")

        if all(not nm or nm in self.consts for nm in names):
            args = [self.consts[nm] if nm else None for nm in names]
            for nm, t in zip(proto.output, self._call(spec, node, args)):
                if nm:
                    self.consts[nm] = t
            return

        scalars = self._scalar_positions(spec, names)
        refs: list[Ref] = []
        metas: list[Any] = []
        for i, nm in enumerate(names):
            if not nm:
                refs.append(("lit", None))
            elif i in spec.static or i in scalars:
                if nm not in self.consts:
                    raise ModelLoadError(
                        f"ONNX node {node.name!r} ({node.op_type}): input {nm!r} must be known at conversion "
                        "time, but it depends on the values of the model inputs")
                c = self.consts[nm]
                refs.append(("lit", c.tolist() if i in spec.static else c.reshape(()).item()))
            else:
                refs.append(self.ref(nm))
            if refs[-1][0] == "lit":
                metas.append(refs[-1][1])
            else:
                metas.append(self.consts[nm].to("meta") if nm in self.consts else self.metas[nm])
        with torch.device("meta"):
            outs = self._call(spec, node, metas)
        if all(t.device.type != "meta" for t in outs):  # e.g. Shape: constant despite runtime inputs
            self.consts.update((nm, t) for nm, t in zip(proto.output, outs) if nm)
            return
        for nm, t in zip(proto.output, outs):
            if nm:
                self.metas[nm] = t if t.device.type == "meta" else t.to("meta")
        self.steps.append(_Step(spec.fn, node, tuple(refs), tuple(proto.output)))


def import_onnx(model: onnx.ModelProto, *, batch: int = 1, seq: int = 128,
                input_shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0) -> ImportedOnnx:
    """Convert ``model`` to a module plus seeded example inputs of the chosen static shapes."""
    model = _validate(model)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS),
                 onnx.defs.onnx_opset_version())
    init_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    input_shapes = dict(input_shapes or {})
    unknown = sorted(set(input_shapes) - {i.name for i in inputs})
    if unknown:
        raise ShapeError(f"input_shapes names unknown input(s) {', '.join(unknown)}; "
                         f"model inputs: {', '.join(i.name for i in inputs)}")

    conv = _Converter(opset)
    tables: dict[str, tuple[int, ...]] = {}
    for t in graph.initializer:
        conv.add_initializer(t.name, tensor_from_proto(t))
        tables[t.name] = tuple(t.dims)
    for n in graph.node:  # Constant nodes can hold embedding tables too
        for a in n.attribute:
            if n.op_type == "Constant" and a.name == "value":
                tables[n.output[0]] = tuple(a.t.dims)
    id_ranges = _embedding_sizes(graph, tables)

    generator = seeded_generator(seed)
    examples = []
    for inp in inputs:
        if not inp.type.HasField("tensor_type"):
            raise ModelLoadError(f"input {inp.name!r}: only tensor inputs are supported")
        dtype = torch_dtype(inp.type.tensor_type.elem_type, f"input {inp.name!r}")
        shape = _input_shape(inp, input_shapes.get(inp.name), batch, seq)
        examples.append(make_input(inp.name, shape, dtype, int_high=id_ranges.get(inp.name, 2),
                                   generator=generator))
        conv.metas[inp.name] = torch.empty(shape, dtype=dtype, device="meta")

    for proto in graph.node:
        conv.convert(proto)
    outputs = [conv.ref(o.name) for o in graph.output]
    module = OnnxGraphModule([i.name for i in inputs], conv.steps, outputs, conv.params, conv.buffers)
    return ImportedOnnx(module.eval(), tuple(examples), [i.name for i in inputs],
                        [o.name for o in graph.output])
