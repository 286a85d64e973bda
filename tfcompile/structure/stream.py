"""Norms, the residual stream, its writers and its readers (norm fusion)."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from tfcompile.graph import ModelGraph
from tfcompile.structure.core import tensor_meta
from tfcompile.structure.shapes import dim_arg, is_scalar, prod, shape_of

aten = torch.ops.aten


# ---------------------------------------------------------------------------
# Norms, the residual stream, its writers and its readers.
#
# The stream is the tree of ``add`` nodes that the norms read (through ops
# that return their input unchanged at inference). Its leaves are the
# *writers*: embedding tables, constant tables (positions, CLS token), patch
# convolutions and the linears/addmms at the end of each branch, reached
# through ops that move, but never mix, the model axis (views, transposes,
# cat along another axis). Every node on the way carries the model dimension
# on a known axis, recorded in ``ResidualStream.dims``.

NORM_OPS = {aten.layer_norm.default, aten.rms_norm.default}

# Ops that only check metadata: they read a value but never pass it on.
METADATA_OPS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}

RESHAPE_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
}

# Ops whose size argument (args[1]) names the model axis explicitly, so a
# pass that changes the model dimension must rewrite it.
SIZED_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}

WRITER_KINDS = ("embedding", "constant", "linear", "addmm", "conv")


def is_passthrough(node: torch.fx.Node) -> bool:
    """True for ops that return their first argument's values unchanged at inference."""
    if node.op != "call_function":
        return False
    if node.target is aten.dropout.default:
        return node.args[2] is False if len(node.args) > 2 else not node.kwargs.get("train", False)
    if node.target in (aten.alias.default, aten.clone.default, aten.detach.default, aten.contiguous.default):
        return True
    if node.target in (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default):
        src = tensor_meta(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
        out = tensor_meta(node)
        return src is not None and out is not None and src.dtype == out.dtype and src.device == out.device
    return False


def real_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that read the value (metadata asserts excluded)."""
    return [u for u in node.users if not (u.op == "call_function" and u.target in METADATA_OPS)]


def _reshape_axis(src: tuple[int, ...], dst: tuple[int, ...], axis: int) -> int | None:
    """The axis of ``src`` that a reshape to ``dst`` keeps intact as ``dst[axis]``.

    A reshape is row-major, so an axis survives unchanged exactly when some
    source axis has the same size and the same stride (product of the sizes
    after it)."""
    size, stride = dst[axis], prod(dst[axis + 1:])
    for i in range(len(src) - 1, -1, -1):
        if src[i] == size and prod(src[i + 1:]) == stride:
            return i
    return None


def axis_through(node: torch.fx.Node, out_axis: int) -> int | None:
    """The axis of ``node.args[0]`` that ``node`` passes on, unmixed, as its ``out_axis``.

    None when the op mixes, reduces, slices along or broadcasts that axis."""
    src, dst = shape_of(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None, shape_of(node)
    if src is None or dst is None:
        return None
    target = node.target
    if is_passthrough(node):
        return out_axis
    if target in RESHAPE_OPS:
        return _reshape_axis(src, dst, out_axis)
    if target is aten.transpose.int:
        a, b = (d % len(src) for d in node.args[1:3])
        return b if out_axis == a else a if out_axis == b else out_axis
    if target is aten.permute.default:
        return node.args[1][out_axis] % len(src)
    if target is aten.t.default:
        return 1 - out_axis if len(src) == 2 else out_axis
    if target is aten.expand.default:
        i = out_axis - (len(dst) - len(src))
        return i if i >= 0 and src[i] == dst[out_axis] else None
    if target is aten.select.int:
        dim = node.args[1] % len(src)
        return out_axis if out_axis < dim else out_axis + 1
    if target is aten.slice.Tensor:
        dim = dim_arg(node, 1, "dim", 0) % len(src)
        return None if dim == out_axis else out_axis
    if target in (aten.mul.Tensor, aten.div.Tensor) and is_scalar(node.args[1]):
        return out_axis
    return None


def axis_forward(node: torch.fx.Node, src_node: torch.fx.Node, in_axis: int) -> int | None:
    """The axis of ``node``'s output that carries ``src_node``'s ``in_axis`` unmixed (None if none)."""
    if not node.args or node.args[0] is not src_node:
        return None
    dst = shape_of(node)
    if dst is None:
        return None
    for out_axis in range(len(dst)):
        if axis_through(node, out_axis) == in_axis:
            return out_axis
    return None


@dataclasses.dataclass(frozen=True)
class NormSite:
    """An ``aten.layer_norm`` / ``aten.rms_norm`` over the last axis.

    ``bias_node`` is an ``add(rms_norm, β)`` right after an RMSNorm: how
    ``layernorm_to_rmsnorm`` keeps LayerNorm's β when it was not folded."""

    node: torch.fx.Node
    kind: str  # "layer_norm" | "rms_norm"
    input: torch.fx.Node
    dim: int
    eps: float | None
    weight: torch.fx.Node | None
    bias: torch.fx.Node | None
    bias_node: torch.fx.Node | None = None

    @property
    def output(self) -> torch.fx.Node:
        return self.bias_node if self.bias_node is not None else self.node

    @property
    def has_affine(self) -> bool:
        return self.weight is not None or self.bias is not None


def _as_node(value) -> torch.fx.Node | None:
    return value if isinstance(value, torch.fx.Node) else None


def norm_sites(graph: ModelGraph) -> list[NormSite]:
    sites = []
    for node in graph.call_nodes():
        if node.target not in NORM_OPS:
            continue
        shape = node.args[1]
        if len(shape) != 1:
            continue
        if node.target is aten.layer_norm.default:
            weight, bias = _as_node(dim_arg(node, 2, "weight")), _as_node(dim_arg(node, 3, "bias"))
            eps = dim_arg(node, 4, "eps", 1e-5)
            sites.append(NormSite(node, "layer_norm", node.args[0], int(shape[0]), eps, weight, bias))
        else:
            weight, eps = _as_node(dim_arg(node, 2, "weight")), dim_arg(node, 3, "eps")
            bias, bias_node = None, None
            users = real_users(node)
            if len(users) == 1 and users[0].target is aten.add.Tensor and users[0].args[0] is node:
                other = users[0].args[1]
                if isinstance(other, torch.fx.Node) and other.op == "get_attr" and shape_of(other) == (shape[0],):
                    bias, bias_node = other, users[0]
            sites.append(NormSite(node, "rms_norm", node.args[0], int(shape[0]), eps, weight, bias, bias_node))
    return sites


@dataclasses.dataclass(frozen=True)
class NormReader:
    """A linear / addmm that reads a norm's output through views that keep the last axis."""

    node: torch.fx.Node
    kind: str  # "linear" (W is out×in) | "addmm" (GPT-2 Conv1D: W is in×out)
    path: tuple[torch.fx.Node, ...]  # nodes between the norm output and the reader
    weight: torch.fx.Node
    bias: torch.fx.Node | None


def _linear_reader(user: torch.fx.Node, value: torch.fx.Node) -> NormReader | None:
    if user.target is aten.linear.default and user.args[0] is value:
        w, b = user.args[1], dim_arg(user, 2, "bias")
        if w is not value and _as_node(w) is not None and w.op == "get_attr" and (
                b is None or (_as_node(b) is not None and b.op == "get_attr")):
            return NormReader(user, "linear", (), w, b)
    if user.target is aten.addmm.default and user.args[1] is value and user.args[0] is not value:
        b, w = user.args[0], user.args[2]
        if (user.kwargs.get("beta", 1) == 1 and user.kwargs.get("alpha", 1) == 1
                and _as_node(w) is not None and w.op == "get_attr" and b.op == "get_attr"):
            return NormReader(user, "addmm", (), w, b)
    return None


def norm_readers(site: NormSite) -> tuple[list[NormReader], str | None]:
    """The linears that read ``site``'s output, or the reason some reader is not one."""
    readers: list[NormReader] = []
    stack: list[tuple[torch.fx.Node, tuple[torch.fx.Node, ...]]] = [(site.output, ())]
    while stack:
        value, path = stack.pop()
        ndim = len(shape_of(value) or ())
        for user in real_users(value):
            reader = _linear_reader(user, value)
            if reader is not None:
                readers.append(dataclasses.replace(reader, path=path))
                continue
            out_axis = axis_forward(user, value, ndim - 1) if user.op == "call_function" else None
            if out_axis is not None and out_axis == len(shape_of(user)) - 1:
                stack.append((user, path + (user,)))
                continue
            what = "the graph output" if user.op == "output" else f"{user.name} ({_op_name(user)})"
            return readers, f"{site.node.name} is read by {what}, not by a linear layer"
    return readers, None


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


@dataclasses.dataclass(frozen=True)
class StreamWriter:
    """A leaf that adds into the residual stream.

    ``node`` produces the contribution (for ``constant`` it is the get_attr
    itself, read by ``consumer``); ``axis`` is the axis of its output that
    carries the model dimension."""

    kind: str  # one of WRITER_KINDS
    node: torch.fx.Node
    axis: int
    consumer: torch.fx.Node
    weight: torch.fx.Node  # the table, the constant, or the layer's weight
    bias: torch.fx.Node | None


@dataclasses.dataclass
class ResidualStream:
    nodes: list[torch.fx.Node]  # adds and pass-through ops that carry the stream
    writers: list[StreamWriter]
    norms: list[NormSite]  # the norms that read the stream
    dims: dict[torch.fx.Node, int]  # model axis of each stream node and each node between a writer and it
    problems: list[str]  # why centring the writers would change the function; empty when it would not
    d: int | None

    @property
    def adds(self) -> list[torch.fx.Node]:
        return [n for n in self.nodes if n.target is aten.add.Tensor]


def _classify_leaf(node: torch.fx.Node, axis: int, consumer: torch.fx.Node) -> StreamWriter | str:
    ndim = len(shape_of(node) or ())
    last = axis == ndim - 1
    if node.op == "get_attr":
        return StreamWriter("constant", node, axis, consumer, node, None)
    if node.op == "placeholder":
        return f"model input {node.name} writes into the residual stream (a runtime vector cannot be centred)"
    target = node.target
    if target is aten.embedding.default and last and node.args[0].op == "get_attr":
        return StreamWriter("embedding", node, axis, consumer, node.args[0], None)
    if target is aten.linear.default and last:
        w, b = node.args[1], dim_arg(node, 2, "bias")
        if w.op == "get_attr" and (b is None or b.op == "get_attr"):
            return StreamWriter("linear", node, axis, consumer, w, b)
    if target is aten.addmm.default and last and not node.kwargs:
        b, w = node.args[0], node.args[2]
        if w.op == "get_attr" and b.op == "get_attr":
            return StreamWriter("addmm", node, axis, consumer, w, b)
    if target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default) \
            and axis == 1:
        transposed = target is aten.convolution.default and node.args[6]
        w, b = node.args[1], dim_arg(node, 2, "bias")
        if not transposed and w.op == "get_attr" and (b is None or b.op == "get_attr"):
            return StreamWriter("conv", node, axis, consumer, w, b)
    return (f"writer {node.name} ({_op_name(node)}) is not an embedding, constant table, linear or "
            f"convolution with constant weights that can be centred")


def _norm_output_owner(node: torch.fx.Node, sites: list[NormSite]) -> NormSite | None:
    for site in sites:
        if node is site.node or node is site.bias_node:
            return site
    return None


def residual_stream(graph: ModelGraph) -> ResidualStream | None:
    """The residual stream read by the graph's last-axis norms (None when there are none)."""
    sites = norm_sites(graph)
    if not sites:
        return None
    sizes = {s.dim for s in sites}
    problems: list[str] = []
    dims: dict[torch.fx.Node, int] = {}
    stream: list[torch.fx.Node] = []
    writers: list[StreamWriter] = []
    reached_from: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    in_stream: set[torch.fx.Node] = set()

    def climb(value: torch.fx.Node, axis: int, consumer: torch.fx.Node, into: torch.fx.Node) -> None:
        """Follow ``value`` (read by ``consumer``, model axis ``axis``) back to stream adds or writers."""
        chain: list[tuple[torch.fx.Node, int, torch.fx.Node]] = []
        node, ax, reader = value, axis, consumer
        while True:
            if node in in_stream:
                end = "stream"
                break
            shape = shape_of(node)
            if node.op == "call_function" and node.target is aten.add.Tensor and shape is not None \
                    and ax == len(shape) - 1 and all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
                end = "add"
                break
            if node.op == "call_function" and node.target is aten.cat.default:
                end = "cat"
                break
            prev = axis_through(node, ax) if node.op == "call_function" and node.args \
                and isinstance(node.args[0], torch.fx.Node) else None
            if prev is None:
                end = "leaf"
                break
            chain.append((node, ax, reader))
            node, ax, reader = node.args[0], prev, node
        if end in ("stream", "add"):
            # Everything between two stream nodes carries the stream too.
            for n, a, _ in chain + [(node, ax, reader)]:
                if n not in in_stream:
                    in_stream.add(n)
                    stream.append(n)
                    dims[n] = a
            if end == "add":
                for operand in node.args[:2]:
                    shape, oshape = shape_of(node), shape_of(operand)
                    if oshape is None or len(oshape) < 1 or oshape[-1] != shape[-1]:
                        problems.append(f"{operand.name} is broadcast along the model axis into {node.name}")
                        continue
                    climb(operand, len(oshape) - 1, node, node)
            return
        for n, a, r in chain:
            dims[n] = a
            reached_from.setdefault(n, set()).add(r)
        if end == "cat":
            dim = dim_arg(node, 1, "dim", 0) % len(shape_of(node))
            dims[node] = ax
            reached_from.setdefault(node, set()).add(reader)
            if dim == ax:
                problems.append(f"{node.name} concatenates along the model axis")
                return
            for part in node.args[0]:
                climb(part, ax, node, into)
            return
        owner = _norm_output_owner(node, sites)
        if owner is not None:
            if len(real_users(node)) > 1 or owner.input in in_stream or \
                    (owner.input.op == "call_function" and owner.input.target is aten.add.Tensor):
                problems.append(f"Post-LN: the output of {owner.node.name} feeds the residual add "
                                f"{into.name}, so the stream carries γ⊙n+β whose mean depends on the data")
            else:
                problems.append(f"Peri/sandwich norm: {owner.node.name} normalises a branch output before "
                                f"the residual add {into.name}; centring it would need a dense d×d matrix")
            return
        leaf = _classify_leaf(node, ax, reader)
        if isinstance(leaf, str):
            problems.append(leaf)
            return
        writers.append(leaf)
        dims[node] = ax
        if leaf.kind != "constant":
            reached_from.setdefault(node, set()).add(reader)

    for site in sites:
        shape = shape_of(site.input)
        if shape is None:
            continue
        climb(site.input, len(shape) - 1, site.node, site.node)

    norm_nodes = {s.node: s for s in sites}
    for node in stream:
        for user in real_users(node):
            if user in in_stream or (user.op == "call_function" and not user.users):
                continue  # dead code reads nothing that reaches an output
            site = norm_nodes.get(user)
            if site is not None and site.input is node:
                continue
            what = "the graph output" if user.op == "output" else f"{user.name} ({_op_name(user)})"
            problems.append(f"raw-stream tap: {node.name} is read by {what}, not by a norm or the next add")
    for node, readers in reached_from.items():
        extra = [u for u in real_users(node) if u not in readers]
        if extra:
            problems.append(f"{node.name} writes into the stream but is also read by {extra[0].name}; "
                            f"centring it would change that reader")
    readers_of_stream = [s for s in sites if s.input in in_stream or s.input in dims]
    order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}
    stream.sort(key=order.__getitem__)
    if len(sizes) != 1:
        problems.append(f"norms over different widths {sorted(sizes)}")
    # Keep the first mention of each problem, in a stable order.
    unique = list(dict.fromkeys(problems))
    return ResidualStream(stream, writers, readers_of_stream, dims, unique,
                          next(iter(sizes)) if len(sizes) == 1 else None)
