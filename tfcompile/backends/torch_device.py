"""Run a ModelGraph's GraphModule with torch on a device (issue 24): cpu or cuda, three modes, four precisions.

What: ``lower_device(graph, device=, mode=, precision=)`` copies the graph to
the device at the precision, runs it once, checks its outputs against the CPU
fp32 reference and returns a ``DeviceLowered`` (a ``runner.Lowered``: zero-arg
``run`` that synchronises, CPU ``outputs``, ``notes``; plus ``launch``, which
only enqueues). ``measure_device`` times several of them round-robin after
warm-up: CUDA events around each launch on cuda, ``perf_counter`` on cpu.

Why: the cost model predicts NVIDIA GPUs; measuring them needs the runtime a
deployment uses (eager PyTorch, CUDA-graph replay, torch.compile/Inductor), and
every line that needs no GPU runs on cpu in CI.

Modes: ``eager`` (the GraphModule, op by op); ``graphs`` (one CUDA graph
captured after three warm-up runs on a side stream, replayed; **refused on
cpu**: there is nothing to replay, and silently timing eager would mislabel
the figure); ``compile`` (``torch.compile``, Inductor: Triton on cuda, C++/
OpenMP on cpu, which needs a C++ compiler; a failure is refused with its
first line).

Precisions: ``fp32`` (TF32 off for matmul and cuDNN convolution, which torch
otherwise runs as TF32), ``tf32`` (fp32 tensors, TF32 tensor cores; cuda only,
refused on cpu), ``bf16``, ``fp16``: parameters and float inputs are cast
(``cast_graph``). Casts the model's code wrote stay as written, so its fp32
islands (RoPE angles, integer positions) keep fp32, as the model run in bf16
by its own library would; where such an island meets a low-precision tensor in
an op that takes one dtype (matmul, SDPA, norm, convolution) its fp32 operands
are cast to the precision. The cast graph's shapes are refreshed, so the cost
model predicts it at its own dtypes.

Tolerances (largest error relative to the reference's largest magnitude, as
``verify.compare_outputs``) are ``structure.precision.RELATIVE_TOLERANCE``'s,
which say why: fp32 1e-4, tf32 and fp16 1e-2, bf16 3e-2.

Preconditions: the graph's example inputs fit it (``graph.run()`` works); cuda
needs ``torch.cuda.is_available()``. No ONNX Runtime or TVM import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Callable

import torch
from torch.fx.node import map_arg

from tfcompile.backends.runner import Lowered
from tfcompile.backends.timing import Measurement
from tfcompile.errors import BackendError, first_line
from tfcompile.graph import ModelGraph, clone, fetch_attr, refresh_shapes
from tfcompile.structure.precision import RELATIVE_TOLERANCE
from tfcompile.verify import compare_outputs

DEVICES = ("cpu", "cuda")
MODES = ("eager", "graphs", "compile")
PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {name: RELATIVE_TOLERANCE[name] for name in PRECISIONS}
GRAPH_WARMUP_RUNS = 3

aten = torch.ops.aten
# Ops whose floating operands must share one dtype (no type promotion).
_ONE_DTYPE_OPS = {aten.linear.default, aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default,
                  aten.matmul.default, aten.scaled_dot_product_attention.default, aten.conv2d.default,
                  aten.convolution.default, aten.layer_norm.default, aten.group_norm.default, aten.rms_norm.default,
                  aten.einsum.default}
# Checks torch.export left in the graph that pin inputs' dtype and device.
_CHECK_OPS = {aten._assert_tensor_metadata.default}


@dataclasses.dataclass
class DeviceLowered(Lowered):
    device: str = "cpu"
    mode: str = "eager"
    precision: str = "fp32"
    launch: Callable[[], object] | None = None  # enqueue one run; ``run`` also waits for it
    max_rel_err: float = 0.0
    tolerance: float = 0.0

    @property
    def label(self) -> str:
        return f"torch {self.device} {self.mode} {self.precision}"


def check_request(device: str, mode: str, precision: str) -> None:
    """Refuse, in one line, what cannot run here."""
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if mode not in MODES:
        raise BackendError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"--device cuda: no CUDA device here (torch {torch.__version__}, "
                           f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu")
    if device == "cpu" and mode == "graphs":
        raise BackendError("mode graphs (CUDA-graph replay) needs --device cuda; on cpu use eager or compile")
    if device == "cpu" and precision == "tf32":
        raise BackendError("precision tf32 is a tensor-core format of NVIDIA GPUs; on cpu use fp32, bf16 or fp16")


def cast_graph(graph: ModelGraph, precision: str) -> ModelGraph:
    """A copy of ``graph`` whose parameters and float inputs are in ``precision``'s dtype (on cpu).

    fp32 and tf32 return ``graph`` itself. Buffers (RoPE frequencies, position
    tables) and the model's explicit casts keep their dtype; ops that take one
    dtype get their fp32 operands cast where they meet low-precision ones.
    """
    dtype = PRECISIONS[precision]
    if dtype == torch.float32:
        return graph
    new = clone(graph, f"{graph.name} {precision}")
    _drop_checks(new.gm)
    cast: dict[int, torch.Tensor] = {}
    for node in new.nodes("get_attr"):
        owner, leaf = _owner(new.gm, node.target)
        if leaf in owner._parameters:
            param = owner._parameters[leaf]
            if param.is_floating_point():
                if id(param) not in cast:
                    cast[id(param)] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=False)
                owner._parameters[leaf] = cast[id(param)]
    new.example_inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in graph.example_inputs)
    try:
        _harmonise(new.gm, new.example_inputs, dtype)
        refresh_shapes(new)
    except Exception as exc:  # torch raises many types from fake propagation
        raise BackendError(f"{graph.name}: cannot run in {precision}: {type(exc).__name__}: {first_line(exc)}") \
            from exc
    return new


def device_copy(graph: ModelGraph, device: str, inputs: tuple[torch.Tensor, ...] | None = None
                ) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...]]:
    """The graph's GraphModule with every attribute on ``device`` and device arguments pointing there, and its
    example inputs (or ``inputs``) moved there (the original's tensors are not touched)."""
    target = torch.device(device)
    gm = clone(graph).gm
    _drop_checks(gm)
    retarget_devices(gm, target)
    moved: dict[int, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, leaf = _owner(gm, node.target)
        value = fetch_attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            continue
        if id(value) not in moved:
            moved[id(value)] = value.detach().to(target)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(moved[id(value)], requires_grad=False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = moved[id(value)]
        else:
            setattr(owner, leaf, moved[id(value)])
    gm.recompile()
    return gm, tuple(t.to(target) for t in (graph.example_inputs if inputs is None else inputs))


def retarget_devices(gm: torch.fx.GraphModule, device: torch.device) -> int:
    """Point every ``device=`` argument of the graph (tensor factories, ``to``) at ``device``; returns how many."""
    changed = 0

    def swap(value):
        nonlocal changed
        if isinstance(value, torch.device) and value != device:
            changed += 1
            return device
        if isinstance(value, (tuple, list)):
            return type(value)(swap(v) for v in value)
        return value

    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = tuple(swap(a) for a in node.args)
            node.kwargs = {k: swap(v) for k, v in node.kwargs.items()}
    return changed


@contextlib.contextmanager
def precision_flags(precision: str):
    """TF32 for matmul and cuDNN convolution on only for ``tf32`` (torch's default runs fp32 convs as TF32)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; mixing it with allow_tf32 is an error there
        flags, values = [(matmul, "fp32_precision"), (cudnn.conv, "fp32_precision")], ("ieee", "tf32")
    else:  # pragma: no cover - older torch
        flags, values = [(matmul, "allow_tf32"), (cudnn, "allow_tf32")], (False, True)
    saved = [getattr(owner, name) for owner, name in flags]
    for owner, name in flags:
        setattr(owner, name, values[precision == "tf32"])
    try:
        yield
    finally:
        for (owner, name), value in zip(flags, saved):
            setattr(owner, name, value)


def lower_device(graph: ModelGraph, *, device: str = "cpu", mode: str = "eager", precision: str = "fp32",
                 reference: tuple[torch.Tensor, ...] | None = None, cast: ModelGraph | None = None,
                 check: bool = True, tolerance: float | None = None,
                 inputs: tuple[torch.Tensor, ...] | None = None) -> DeviceLowered:
    """Copy ``graph`` to ``device`` at ``precision``, prepare ``mode``, run it once and check the outputs.

    ``reference``: the CPU fp32 outputs of ``graph`` (computed when not given; pass them to share one
    reference between lowerings). ``cast``: ``cast_graph(graph, precision)``, made once for several modes.
    ``check``: raise ``BackendError`` when the error relative to the reference's
    largest magnitude exceeds ``tolerance`` (default ``TOLERANCE[precision]``); else only record it.
    ``inputs``: run on these (same shapes as the example inputs, fp32; float ones are cast to the precision)
    instead of ``graph.example_inputs``; ``reference`` must then be ``graph.run(inputs)``.
    """
    check_request(device, mode, precision)
    tolerance = TOLERANCE[precision] if tolerance is None else tolerance
    reference = graph.run(inputs) if reference is None else reference
    if inputs is not None:
        inputs = tuple(t.to(PRECISIONS[precision]) if t.is_floating_point() else t for t in inputs)
    gm, inputs = device_copy(cast if cast is not None else cast_graph(graph, precision), device, inputs)
    notes = []

    def call():
        with torch.no_grad():
            return gm(*inputs)

    launch: Callable[[], object] = call
    with precision_flags(precision):
        try:
            if mode == "graphs":
                launch, outputs = _capture(call)
                notes.append(f"one CUDA graph, captured after {GRAPH_WARMUP_RUNS} warm-up runs")
            elif mode == "compile":
                compiled = torch.compile(gm, dynamic=False)

                def launch():
                    with torch.no_grad():
                        return compiled(*inputs)

                outputs = launch()
                notes.append(f"torch.compile (Inductor, {'Triton' if device == 'cuda' else 'C++'})")
            else:
                outputs = call()
        except Exception as exc:  # capture and compilation raise many types
            raise BackendError(f"{graph.name}: {mode} on {device} failed: {type(exc).__name__}: "
                               f"{first_line(exc)}") from exc
        _synchronise(device)
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    outputs = tuple(o.detach().to("cpu").float() if o.is_floating_point() else o.detach().to("cpu")
                    for o in outputs)
    error = compare_outputs(reference, outputs, graph.output_names).max_rel_err
    notes.append(f"max relative error {error:.1e} against cpu fp32 (tolerance {tolerance:.0e})")
    if check and not error <= tolerance:
        raise BackendError(f"{graph.name}: torch {device} {mode} {precision} output differs from cpu fp32 by "
                           f"{error:.1e} relative (tolerance {tolerance:.0e})")

    def run():
        with precision_flags(precision):
            launch()
        _synchronise(device)

    def launch_at_precision():
        with precision_flags(precision):
            return launch()

    return DeviceLowered("torch", run, outputs, notes=notes, device=device, mode=mode, precision=precision,
                         launch=launch_at_precision, max_rel_err=error, tolerance=tolerance)


def measure_device(lowered: dict[str, DeviceLowered], *, warmup: int = 3, repeat: int = 20,
                   max_total_s: float | None = None) -> dict[str, Measurement]:
    """Median per lowering, timed round-robin after ``warmup`` runs each; one device for all.

    cuda: CUDA events recorded around each launch on the current stream (the stream is idle before each),
    so the figure is the GPU's time from the first kernel's enqueue to the last one's end, host gaps
    included. cpu: ``perf_counter`` around each run. ``max_total_s``: stop after the turn that spends it
    (at least 3 turns), every lowering keeping the same number of samples.
    """
    devices = {low.device for low in lowered.values()}
    if len(devices) != 1:
        raise BackendError(f"measure_device times one device at a time, got {sorted(devices)}")
    time_once = _cuda_time if devices == {"cuda"} else _wall_time
    for low in lowered.values():
        for _ in range(warmup):
            low.run()
    samples: dict[str, list[float]] = {name: [] for name in lowered}
    started = time.perf_counter()
    for turn in range(repeat):
        for name, low in lowered.items():
            samples[name].append(time_once(low))
        if max_total_s is not None and turn >= 2 and time.perf_counter() - started > max_total_s:
            break
    return {name: Measurement(lowered[name].label, statistics.median(s), tuple(s)) for name, s in samples.items()}


def _wall_time(low: DeviceLowered) -> float:
    start = time.perf_counter()
    low.run()
    return time.perf_counter() - start


def _cuda_time(low: DeviceLowered) -> float:  # pragma: no cover - needs a GPU (benchmarks/gpu_check.py)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    low.launch()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _capture(call: Callable[[], object]):  # pragma: no cover - needs a GPU (benchmarks/gpu_check.py)
    """Warm up on a side stream (the caching allocator and cuBLAS settle there), then capture one run."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP_RUNS):
            call()
    torch.cuda.current_stream().wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        static_outputs = call()
    cuda_graph.replay()
    return cuda_graph.replay, static_outputs


def _synchronise(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _owner(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    parent, _, leaf = target.rpartition(".")
    return (gm.get_submodule(parent) if parent else gm), leaf


def _drop_checks(gm: torch.fx.GraphModule) -> None:
    """Remove torch.export's input guards and dtype/device assertions: the copy's inputs change both."""
    for node in list(gm.graph.nodes):
        if node.users:
            continue
        if (node.op == "call_function" and node.target in _CHECK_OPS) or \
                (node.op == "call_module" and node.target == "_guards_fn"):
            gm.graph.erase_node(node)
    gm.recompile()


def _harmonise(gm: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> None:
    """Propagate fake tensors through ``gm``; before each one-dtype op whose floating operands mix dtypes,
    insert casts of those not in ``dtype``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = gm.graph
    casts: dict[torch.fx.Node, torch.fx.Node] = {}  # one cast per tensor, placed before its first such use

    class Harmoniser(torch.fx.Interpreter):
        def run_node(self, node):
            if node.op == "call_function" and node.target in _ONE_DTYPE_OPS:
                floats = {v.dtype for v in (self.env[a] for a in node.all_input_nodes)
                          if isinstance(v, torch.Tensor) and v.is_floating_point()}
                if len(floats) > 1:
                    node.args = map_arg(node.args, lambda a: self._cast(a, node))
                    node.kwargs = map_arg(node.kwargs, lambda a: self._cast(a, node))
            return super().run_node(node)

        def _cast(self, arg, node):
            value = self.env[arg]
            if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype):
                return arg
            if arg not in casts:
                with graph.inserting_before(node):
                    casts[arg] = graph.call_function(aten._to_copy.default, (arg,), {"dtype": dtype})
                self.env[casts[arg]] = value.to(dtype)
            return casts[arg]

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.no_grad():
        Harmoniser(gm, garbage_collect_values=False).run(*[mode.from_tensor(t) for t in inputs])
    graph.lint()
    gm.recompile()
