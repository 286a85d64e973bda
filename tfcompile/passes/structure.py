"""Structure recognition shared by every pass.

Passes ask this module, not the raw graph, which nodes are linear layers and
their weights, which values depend on the model inputs, and which block a node
came from, so every pass sees the model the same way.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from tfcompile.graph import ModelGraph, fetch_attr

aten = torch.ops.aten

# Ops whose result depends on an input tensor's shape, dtype or device only,
# never on its values: with static shapes they are constants.
SHAPE_ONLY_OPS = {
    aten.new_ones.default,
    aten.new_zeros.default,
    aten.new_full.default,
    aten.ones_like.default,
    aten.zeros_like.default,
    aten.full_like.default,
    aten.sym_size.int,
}

# Ops whose results are not a function of their arguments.
NONDETERMINISTIC_OPS = {
    aten.rand.default,
    aten.randn.default,
    aten.randint.default,
    aten.rand_like.default,
    aten.randn_like.default,
    aten.bernoulli.default,
    aten.empty.memory_format,
    aten.new_empty.default,
    aten.empty_like.default,
}


@dataclasses.dataclass(frozen=True)
class LinearSite:
    """An ``aten.linear(x, W, b)`` whose W (and b) are model attributes."""

    node: torch.fx.Node
    input: torch.fx.Node
    weight_target: str
    bias_target: str | None

    def weight(self, graph: ModelGraph) -> torch.Tensor:
        return fetch_attr(graph.gm, self.weight_target)

    def bias(self, graph: ModelGraph) -> torch.Tensor | None:
        return None if self.bias_target is None else fetch_attr(graph.gm, self.bias_target)


def linear_sites(graph: ModelGraph) -> list[LinearSite]:
    sites = []
    for node in graph.call_nodes():
        if node.target is not aten.linear.default:
            continue
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
            continue
        if b is not None and not (isinstance(b, torch.fx.Node) and b.op == "get_attr"):
            continue
        sites.append(LinearSite(node, x, w.target, None if b is None else b.target))
    return sites


def input_dependent_nodes(graph: ModelGraph) -> set[torch.fx.Node]:
    """Nodes whose value can change when the model's input values change."""
    dependent: set[torch.fx.Node] = set()
    for node in graph.gm.graph.nodes:
        if node.op == "placeholder":
            dependent.add(node)
        elif node.op == "call_function":
            if node.target in NONDETERMINISTIC_OPS:
                dependent.add(node)
            elif node.target in SHAPE_ONLY_OPS:
                continue
            elif any(arg in dependent for arg in node.all_input_nodes):
                dependent.add(node)
        elif node.op in ("call_module", "call_method"):
            if any(arg in dependent for arg in node.all_input_nodes):
                dependent.add(node)
    return dependent


def module_path(node: torch.fx.Node) -> str:
    """The innermost module the node was traced from, e.g. 'm.transformer.h.3.attn'."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def tensor_meta(node: torch.fx.Node) -> torch.Tensor | None:
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def unique_attr_name(gm: torch.fx.GraphModule, base: str) -> str:
    base = base.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_constant(gm: torch.fx.GraphModule, base: str, value: torch.Tensor) -> str:
    """Register ``value`` as a new buffer on ``gm`` and return its attribute name."""
    name = unique_attr_name(gm, base)
    gm.register_buffer(name, value.detach(), persistent=True)
    return name


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


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    value = tensor_meta(node)
    return None if value is None else tuple(int(s) for s in value.shape)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _reshape_axis(src: tuple[int, ...], dst: tuple[int, ...], axis: int) -> int | None:
    """The axis of ``src`` that a reshape to ``dst`` keeps intact as ``dst[axis]``.

    A reshape is row-major, so an axis survives unchanged exactly when some
    source axis has the same size and the same stride (product of the sizes
    after it)."""
    size, stride = dst[axis], _prod(dst[axis + 1:])
    for i in range(len(src) - 1, -1, -1):
        if src[i] == size and _prod(src[i + 1:]) == stride:
            return i
    return None


def _dim_arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def axis_through(node: torch.fx.Node, out_axis: int) -> int | None:
    """The axis of ``node.args[0]`` that ``node`` passes on, unmixed, as its ``out_axis``.

    None when the op mixes, reduces, slices along or broadcasts that axis."""
    src, dst = _shape(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None, _shape(node)
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
        dim = _dim_arg(node, 1, "dim", 0) % len(src)
        return None if dim == out_axis else out_axis
    if target in (aten.mul.Tensor, aten.div.Tensor) and _is_scalar(node.args[1]):
        return out_axis
    return None


def axis_forward(node: torch.fx.Node, src_node: torch.fx.Node, in_axis: int) -> int | None:
    """The axis of ``node``'s output that carries ``src_node``'s ``in_axis`` unmixed (None if none)."""
    if not node.args or node.args[0] is not src_node:
        return None
    dst = _shape(node)
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
            weight, bias = _as_node(_dim_arg(node, 2, "weight")), _as_node(_dim_arg(node, 3, "bias"))
            eps = _dim_arg(node, 4, "eps", 1e-5)
            sites.append(NormSite(node, "layer_norm", node.args[0], int(shape[0]), eps, weight, bias))
        else:
            weight, eps = _as_node(_dim_arg(node, 2, "weight")), _dim_arg(node, 3, "eps")
            bias, bias_node = None, None
            users = real_users(node)
            if len(users) == 1 and users[0].target is aten.add.Tensor and users[0].args[0] is node:
                other = users[0].args[1]
                if isinstance(other, torch.fx.Node) and other.op == "get_attr" and _shape(other) == (shape[0],):
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
        w, b = user.args[1], _dim_arg(user, 2, "bias")
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
        ndim = len(_shape(value) or ())
        for user in real_users(value):
            reader = _linear_reader(user, value)
            if reader is not None:
                readers.append(dataclasses.replace(reader, path=path))
                continue
            out_axis = axis_forward(user, value, ndim - 1) if user.op == "call_function" else None
            if out_axis is not None and out_axis == len(_shape(user)) - 1:
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
    ndim = len(_shape(node) or ())
    last = axis == ndim - 1
    if node.op == "get_attr":
        return StreamWriter("constant", node, axis, consumer, node, None)
    if node.op == "placeholder":
        return f"model input {node.name} writes into the residual stream (a runtime vector cannot be centred)"
    target = node.target
    if target is aten.embedding.default and last and node.args[0].op == "get_attr":
        return StreamWriter("embedding", node, axis, consumer, node.args[0], None)
    if target is aten.linear.default and last:
        w, b = node.args[1], _dim_arg(node, 2, "bias")
        if w.op == "get_attr" and (b is None or b.op == "get_attr"):
            return StreamWriter("linear", node, axis, consumer, w, b)
    if target is aten.addmm.default and last and not node.kwargs:
        b, w = node.args[0], node.args[2]
        if w.op == "get_attr" and b.op == "get_attr":
            return StreamWriter("addmm", node, axis, consumer, w, b)
    if target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default) \
            and axis == 1:
        transposed = target is aten.convolution.default and node.args[6]
        w, b = node.args[1], _dim_arg(node, 2, "bias")
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
            shape = _shape(node)
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
                    shape, oshape = _shape(node), _shape(operand)
                    if oshape is None or len(oshape) < 1 or oshape[-1] != shape[-1]:
                        problems.append(f"{operand.name} is broadcast along the model axis into {node.name}")
                        continue
                    climb(operand, len(oshape) - 1, node, node)
            return
        for n, a, r in chain:
            dims[n] = a
            reached_from.setdefault(n, set()).add(r)
        if end == "cat":
            dim = _dim_arg(node, 1, "dim", 0) % len(_shape(node))
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
        shape = _shape(site.input)
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


# ---------------------------------------------------------------------------
# Norms written out as arithmetic (Llama's RMSNorm, hand-written LayerNorms).

@dataclasses.dataclass(frozen=True)
class DecomposedNorm:
    """``x * rsqrt(mean(x²) + ε) [* w]`` (RMSNorm) or
    ``(x − μ) * rsqrt(mean((x − μ)²) + ε) [* w] [+ b]`` (LayerNorm) over the last axis."""

    kind: str  # "rms_norm" | "layer_norm"
    input: torch.fx.Node
    output: torch.fx.Node
    nodes: tuple[torch.fx.Node, ...]  # the subgraph that one fused node replaces
    dim: int
    eps: float
    weight: torch.fx.Node | None
    bias: torch.fx.Node | None


def _strip_passthrough(node):
    while isinstance(node, torch.fx.Node) and is_passthrough(node):
        node = node.args[0]
    return node


def _last_axis_mean_of(node) -> torch.fx.Node | None:
    """x when ``node`` is mean(x, -1, keepdim=True) over the last axis."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is aten.mean.dim):
        return None
    x, dims = node.args[0], node.args[1]
    keepdim = _dim_arg(node, 2, "keepdim", False)
    ndim = len(_shape(x) or ())
    if node.kwargs.get("dtype") is not None or not keepdim or list(dims) not in ([-1], [ndim - 1]):
        return None
    return x


def _square_of(node) -> torch.fx.Node | None:
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function"):
        return None
    if node.target is aten.pow.Tensor_Scalar and node.args[1] == 2:
        return node.args[0]
    if node.target is aten.mul.Tensor and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _same_value(a, b) -> bool:
    """a and b compute the same thing (one node, or two identical pure ops)."""
    a, b = _strip_passthrough(a), _strip_passthrough(b)
    if a is b:
        return True
    return (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a.op == b.op == "call_function"
            and a.target is b.target and a.target in (aten.sub.Tensor, aten.mean.dim)
            and all(_same_value(x, y) if isinstance(x, torch.fx.Node) else x == y for x, y in zip(a.args, b.args))
            and len(a.args) == len(b.args) and a.kwargs == b.kwargs)


def _centred_input(node) -> torch.fx.Node | None:
    """x when ``node`` is x − mean(x, -1, keepdim=True)."""
    node = _strip_passthrough(node)
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is aten.sub.Tensor):
        return None
    if node.kwargs.get("alpha", 1) != 1:
        return None
    x, m = node.args[0], node.args[1]
    mx = _last_axis_mean_of(_strip_passthrough(m))
    return _strip_passthrough(x) if mx is not None and _same_value(mx, x) else None


def _unique_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = real_users(node)
    return users[0] if len(users) == 1 else None


def _other_arg(node: torch.fx.Node, known) -> object:
    a, b = node.args[0], node.args[1]
    return b if _strip_passthrough(a) is _strip_passthrough(known) or a is known else a


def _vector_attr(value, d: int) -> bool:
    return isinstance(value, torch.fx.Node) and value.op == "get_attr" and _shape(value) == (d,)


def _match_norm_at(r: torch.fx.Node) -> DecomposedNorm | None:
    """Match a norm around ``r`` = rsqrt(stat + ε) (or sqrt, used in a division)."""
    if r.target not in (aten.rsqrt.default, aten.sqrt.default):
        return None
    a = r.args[0]
    if not (isinstance(a, torch.fx.Node) and a.target is aten.add.Tensor):
        return None
    stat, eps = (a.args[0], a.args[1]) if _is_scalar(a.args[1]) else (a.args[1], a.args[0])
    if not _is_scalar(eps) or not isinstance(stat, torch.fx.Node):
        return None
    # The statistic: mean of a square (of x, or of x − μ), or var(x, correction=0).
    if stat.target in (aten.var.correction, aten.var.dim):
        x = _strip_passthrough(stat.args[0])
        ndim = len(_shape(x) or ())
        if stat.target is aten.var.dim:  # var(x, dim, unbiased, keepdim)
            biased = _dim_arg(stat, 2, "unbiased", True) is False
            keepdim = _dim_arg(stat, 3, "keepdim", False)
        else:  # var(x, dim, *, correction, keepdim)
            biased = stat.kwargs.get("correction", 1) == 0
            keepdim = stat.kwargs.get("keepdim", False)
        if list(_dim_arg(stat, 1, "dim", []) or []) not in ([-1], [ndim - 1]) or not biased or not keepdim:
            return None
        kind = "layer_norm"
    else:
        sq = _square_of(_last_axis_mean_of(stat))
        if sq is None:
            return None
        x = _centred_input(sq)
        kind = "layer_norm" if x is not None else "rms_norm"
        if x is None:
            x = _strip_passthrough(sq)
    # The normalisation: (x or x − μ) * rsqrt(...) or (x or x − μ) / sqrt(...).
    n = _unique_user(r)
    if n is None:
        return None
    if r.target is aten.rsqrt.default and n.target is aten.mul.Tensor:
        c = _other_arg(n, r)
    elif r.target is aten.sqrt.default and n.target is aten.div.Tensor and n.args[1] is r:
        c = n.args[0]
    else:
        return None
    if kind == "layer_norm":
        if _centred_input(c) is not x:
            return None
    elif _strip_passthrough(c) is not x:
        return None
    shape = _shape(x)
    if not shape or _shape(n) != shape:
        return None
    d = shape[-1]
    out, weight, bias = n, None, None
    nxt = _unique_user(out)
    while nxt is not None and is_passthrough(nxt):
        out, nxt = nxt, _unique_user(nxt)
    if nxt is not None and nxt.target is aten.mul.Tensor and _vector_attr(_other_arg(nxt, out), d):
        weight, out = _other_arg(nxt, out), nxt
        nxt = _unique_user(out)
    if kind == "layer_norm" and nxt is not None and nxt.target is aten.add.Tensor \
            and not nxt.kwargs and _vector_attr(_other_arg(nxt, out), d):
        bias, out = _other_arg(nxt, out), nxt
    # Collect the subgraph between x and out; none of it may be read from outside.
    inner: set[torch.fx.Node] = set()
    stack = [out]
    while stack:
        node = stack.pop()
        if node in inner or node is x or node.op != "call_function":
            continue
        inner.add(node)
        stack.extend(node.all_input_nodes)
    # Casts of x that are no-ops stay (others may read them); the fused node reads x.
    inner = {n for n in inner if not (is_passthrough(n) and _strip_passthrough(n) is x)}
    if any(u not in inner for node in inner if node is not out for u in real_users(node)):
        return None
    if any(t.op == "call_function" and t.target not in {
            aten.mean.dim, aten.sub.Tensor, aten.pow.Tensor_Scalar, aten.mul.Tensor, aten.add.Tensor,
            aten.rsqrt.default, aten.sqrt.default, aten.div.Tensor, aten.var.correction, aten.var.dim} and not is_passthrough(t)
           for t in inner):
        return None
    order = {node: i for i, node in enumerate(out.graph.nodes)}
    return DecomposedNorm(kind, x, out, tuple(sorted(inner, key=order.__getitem__)), d, float(eps), weight, bias)


def decomposed_norms(graph: ModelGraph) -> list[DecomposedNorm]:
    """Every RMSNorm / LayerNorm written out as arithmetic over the last axis."""
    found = []
    for node in graph.call_nodes():
        match = _match_norm_at(node)
        if match is not None:
            found.append(match)
    return found


# ---------------------------------------------------------------------------
# Token sequences and attention (padding removal, prepacking).

@dataclasses.dataclass(frozen=True)
class SequenceInputs:
    """The model inputs indexed by (batch, position): token ids and attention masks."""

    batch: int
    seq: int
    tokens: list[torch.fx.Node]  # integer [B, L, ...] inputs (ids, token types, positions)
    masks: list[torch.fx.Node]  # inputs named like a mask


def sequence_inputs(graph: ModelGraph) -> SequenceInputs | None:
    """None when the model has no integer [B, L] token input (e.g. a vision model)."""
    placeholders = graph.nodes("placeholder")
    names = list(graph.input_names) + [p.name for p in placeholders[len(graph.input_names):]]
    tokens, masks, size = [], [], None
    for node, name in zip(placeholders, names):
        value = tensor_meta(node)
        if value is None or value.dim() < 2:
            continue
        if "mask" in name.lower():
            masks.append(node)
        elif not value.dtype.is_floating_point and value.dtype != torch.bool:
            if size is None:
                size = tuple(int(s) for s in value.shape[:2])
            if tuple(value.shape[:2]) == size:
                tokens.append(node)
    if size is None:
        return None
    return SequenceInputs(size[0], size[1], tokens, masks)


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """An ``aten.scaled_dot_product_attention`` node and its masking arguments."""

    node: torch.fx.Node
    mask: torch.fx.Node | None
    is_causal: bool


def attention_sites(graph: ModelGraph) -> list[AttentionSite]:
    sites = []
    for node in graph.call_nodes():
        if node.target is not aten.scaled_dot_product_attention.default:
            continue
        mask = _dim_arg(node, 3, "attn_mask")
        sites.append(AttentionSite(node, mask if isinstance(mask, torch.fx.Node) else None,
                                   bool(_dim_arg(node, 5, "is_causal", False))))
    return sites


# ---------------------------------------------------------------------------
# GEMMs with constant weights, FFN blocks and chains of linear maps
# (structure_ffn, premerge_ffn).

from operator import getitem as _getitem  # noqa: E402  (this section was appended to the module)

@dataclasses.dataclass(frozen=True)
class GemmSite:
    """``aten.linear(x, W, b)`` (W is out×in) or GPT-2's Conv1D ``aten.addmm(b, x, W)`` (W is in×out).

    W and b are model attributes; ``input`` is the dynamic operand."""

    node: torch.fx.Node
    kind: str  # "linear" | "addmm"
    input: torch.fx.Node
    weight_target: str
    bias_target: str | None

    def weight(self, graph: ModelGraph) -> torch.Tensor:
        """The weight as out×in, whatever the op's own layout."""
        w = fetch_attr(graph.gm, self.weight_target)
        return w.t() if self.kind == "addmm" else w

    def bias(self, graph: ModelGraph) -> torch.Tensor | None:
        return None if self.bias_target is None else fetch_attr(graph.gm, self.bias_target)

    @property
    def tokens(self) -> int:
        """Rows of the GEMM: every leading axis of the input counts as tokens."""
        shape = _shape(self.input) or (0,)
        return _prod(shape[:-1])


def _attr(value) -> bool:
    return isinstance(value, torch.fx.Node) and value.op == "get_attr"


def gemm_site(node: torch.fx.Node) -> GemmSite | None:
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        x, w, b = node.args[0], node.args[1], _dim_arg(node, 2, "bias")
        if isinstance(x, torch.fx.Node) and _attr(w) and (b is None or _attr(b)):
            return GemmSite(node, "linear", x, w.target, None if b is None else b.target)
    if node.target is aten.addmm.default and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
        b, x, w = node.args[:3]
        if isinstance(x, torch.fx.Node) and not _attr(x) and _attr(w) and _attr(b):
            return GemmSite(node, "addmm", x, w.target, b.target)
    return None


def gemm_sites(graph: ModelGraph) -> list[GemmSite]:
    return [s for s in (gemm_site(n) for n in graph.call_nodes()) if s is not None]


# Ops an FFN's hidden activation may pass through between its up and down
# projections: pointwise maths (the activation itself, GLU gating) and views.
_POINTWISE_OPS = {
    aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
    aten.erf.default, aten.exp.default, aten.neg.default, aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor,
    aten.add.Scalar, aten.sub.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar, aten.hardswish.default,
    aten.leaky_relu.default, aten.softplus.default, aten.mish.default, aten.relu6.default,
    aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default,
}
# A nonlinearity must sit between the projections, else the pair is a linear chain.
_NONLINEAR_OPS = {
    aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
    aten.erf.default, aten.exp.default, aten.hardswish.default, aten.leaky_relu.default,
    aten.softplus.default, aten.mish.default, aten.relu6.default, aten.hardtanh.default,
    aten.clamp.default, aten.clamp_min.default,
}
_SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.slice.Tensor}


@dataclasses.dataclass(frozen=True)
class FFNBlock:
    """Up (and gate) projections → pointwise activation → down projection."""

    ups: tuple[GemmSite, ...]  # in graph order; one node when gate/up were merged
    down: GemmSite
    hidden: tuple[torch.fx.Node, ...]  # the activation subgraph between them

    @property
    def name(self) -> str:
        return module_path(self.down.node) or self.down.node.name

    @property
    def sites(self) -> tuple[GemmSite, ...]:
        return self.ups + (self.down,)


def _strip_views(node: torch.fx.Node) -> torch.fx.Node:
    while node.op == "call_function" and (node.target in RESHAPE_OPS or is_passthrough(node)):
        node = node.args[0]
    return node


def ffn_blocks(graph: ModelGraph) -> list[FFNBlock]:
    """Every FFN block, found from its down projection backwards.

    The hidden activation must be computed from the up projections alone
    (pointwise ops, views, splits of a merged gate/up GEMM) and read by
    nothing but the down projection, so replacing any of the three GEMMs
    touches nothing else."""
    dependent = input_dependent_nodes(graph)
    sites = {s.node: s for s in gemm_sites(graph)}
    order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}
    blocks = []
    for down in sites.values():
        ups: dict[torch.fx.Node, GemmSite] = {}
        hidden: set[torch.fx.Node] = set()
        nonlinear, ok = False, True
        stack = [down.input]
        while stack and ok:
            node = stack.pop()
            if node in sites:
                ups[node] = sites[node]
                continue
            if node in hidden:
                continue
            is_op = node.op == "call_function"
            if is_op and node.target is aten.mul.Tensor and all(a in dependent for a in node.args[:2]
                                                                if isinstance(a, torch.fx.Node)) \
                    and sum(isinstance(a, torch.fx.Node) for a in node.args[:2]) == 2:
                nonlinear = True  # a product of two activations: GLU gating, or x·tanh(...) in GELU
            if not is_op or not (node.target in _POINTWISE_OPS or node.target in RESHAPE_OPS
                                 or node.target in _SPLIT_OPS or node.target is _getitem
                                 or is_passthrough(node)):
                ok = False
                break
            nonlinear |= node.target in _NONLINEAR_OPS
            hidden.add(node)
            stack.extend(a for a in node.all_input_nodes if a in dependent)
        if not ok or not ups or not nonlinear:
            continue
        ups_sorted = sorted(ups.values(), key=lambda s: order[s.node])
        if len({_strip_views(s.input) for s in ups_sorted}) != 1:
            continue
        inside = hidden | {down.node}
        if any(u not in inside for n in list(hidden) + [s.node for s in ups_sorted] for u in real_users(n)):
            continue  # the hidden activation is read elsewhere (an exported tap, another branch)
        blocks.append(FFNBlock(tuple(ups_sorted), down, tuple(sorted(hidden, key=order.__getitem__))))
    return blocks


# Ops that are affine in their one input-dependent operand and never mix
# token rows by themselves (whether a whole chain is token-wise is checked
# numerically by the pass that merges it).
_CHAIN_VIEW_OPS = RESHAPE_OPS | {aten.transpose.int, aten.permute.default, aten.t.default,
                                 aten.contiguous.default, aten.clone.default, aten.alias.default}
CHAIN_GEMM_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default,
                   aten.matmul.default, aten.einsum.default}
_CHAIN_AFFINE_OPS = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar,
                     aten.div.Scalar, aten.add.Scalar, aten.neg.default}


@dataclasses.dataclass(frozen=True)
class LinearChain:
    """A path of ops, each affine in the previous one, with two or more constant-weight GEMMs.

    Every node but the last is read only by the next one. ``entry`` is what
    the first node reads."""

    entry: torch.fx.Node
    nodes: tuple[torch.fx.Node, ...]
    gemms: tuple[int, ...]  # indices into ``nodes`` of the GEMMs

    @property
    def name(self) -> str:
        return module_path(self.nodes[self.gemms[-1]]) or self.nodes[self.gemms[-1]].name


def _chain_arg(node: torch.fx.Node, dependent: set[torch.fx.Node]) -> torch.fx.Node | None:
    """The one input-dependent operand of an affine op (None if the op is not one)."""
    if node.op != "call_function" or node not in dependent:
        return None
    dyn = list(dict.fromkeys(a for a in node.all_input_nodes if a in dependent))
    if len(dyn) != 1:
        return None
    target = node.target
    if target in _CHAIN_VIEW_OPS or is_passthrough(node) or target in CHAIN_GEMM_OPS:
        return dyn[0]
    if target in _CHAIN_AFFINE_OPS:
        # c / x is not linear in x; x ± c, c·x and x / c are.
        return None if target in (aten.div.Tensor, aten.div.Scalar) and node.args[0] is not dyn[0] else dyn[0]
    return None


def linear_chains(graph: ModelGraph) -> list[LinearChain]:
    """Maximal chains of affine ops that contain at least two GEMMs with constant weights."""
    dependent = input_dependent_nodes(graph)
    chains, seen = [], set()
    for node in graph.call_nodes():
        if node in seen or node.target not in CHAIN_GEMM_OPS or _chain_arg(node, dependent) is None:
            continue
        nodes = [node]
        prev = _chain_arg(node, dependent)
        while prev is not None and _chain_arg(prev, dependent) is not None and real_users(prev) == [nodes[0]] \
                and prev not in seen:
            nodes.insert(0, prev)
            prev = _chain_arg(prev, dependent)
        while True:
            users = real_users(nodes[-1])
            if len(users) != 1 or _chain_arg(users[0], dependent) is not nodes[-1]:
                break
            nodes.append(users[0])
        seen.update(nodes)
        gemms = tuple(i for i, n in enumerate(nodes) if n.target in CHAIN_GEMM_OPS)
        if len(gemms) >= 2:
            chains.append(LinearChain(_chain_arg(nodes[0], dependent), tuple(nodes), gemms))
    return chains


def drop_unused_attrs(gm: torch.fx.GraphModule, targets: set[str]) -> None:
    """Delete those of ``targets`` that no get_attr reads any more from ``gm``.

    For passes on a clone (``apply_pass``): the clone's modules are its own, so
    the original keeps its weights, and exports of the variant do not carry
    the replaced ones."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets - used:
        *path, field = target.split(".")
        owner = gm
        for part in path:
            owner = getattr(owner, part, None)
        if owner is not None and hasattr(owner, field):
            delattr(owner, field)


# ---------------------------------------------------------------------------
# Evaluating parts of a graph


def evaluate_nodes(graph: ModelGraph, nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, object]:
    """The values of ``nodes`` on the example inputs, running only the ops they depend on.

    Ops that read only an input's shape (``SHAPE_ONLY_OPS``) get an empty tensor
    of that shape, so a constant built from an activation's shape does not
    evaluate the activation.
    """
    needed: set[torch.fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if not (node.op == "call_function" and node.target in SHAPE_ONLY_OPS):
            stack.extend(node.all_input_nodes)
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    env: dict[torch.fx.Node, object] = {}

    def shape_stand_in(arg: torch.fx.Node) -> object:
        fake = tensor_meta(arg)
        return torch.empty(fake.shape, dtype=fake.dtype) if fake is not None else env[arg]

    with torch.no_grad():
        for node in graph.gm.graph.nodes:
            if node not in needed:
                continue
            if node.op == "placeholder":
                env[node] = graph.example_inputs[placeholders.index(node)]
            elif node.op == "get_attr":
                env[node] = fetch_attr(graph.gm, node.target)
            elif node.op == "call_function":
                read = shape_stand_in if node.target in SHAPE_ONLY_OPS else env.__getitem__
                env[node] = node.target(*torch.fx.node.map_arg(node.args, read),
                                        **torch.fx.node.map_arg(node.kwargs, read))
            else:
                raise ValueError(f"{node.name} ({node.op}) cannot be evaluated")
    return {n: env[n] for n in nodes}
