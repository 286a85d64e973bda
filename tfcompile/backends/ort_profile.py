"""Where ONNX Runtime spends a run, node by node, from its own profiler.

ORT's profiler writes one event per node run (``<node>_kernel_time``) with the
node's op type, its input and output shapes and the bytes of its constant
inputs (``parameter_size``), and one ``model_run`` event per run. The first run
after the session is made is a warm-up (allocations, thread pool start) and is
dropped; the node times of the others are averaged per run. The gap between a
run and the sum of its node times is what the runtime spends between kernels.

The session is made as ``ort.OrtModel`` makes the one that is timed (same
threads, same graph optimisations), so the kernels profiled are the kernels
timed. Profiling adds a little to every node; shares are comparable, absolute
times a few percent high.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class NodeTime:
    name: str
    op_type: str
    ms_per_run: float
    parameter_bytes: int  # bytes of the node's constant inputs that live in the ONNX file itself
    input_shapes: tuple[tuple[int, ...], ...]
    output_shapes: tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class RunProfile:
    nodes: tuple[NodeTime, ...]
    run_ms: float  # mean over the profiled runs of ORT's own model_run duration

    @property
    def between_kernels_ms(self) -> float:
        return max(self.run_ms - sum(n.ms_per_run for n in self.nodes), 0.0)


def _shapes(entries) -> tuple[tuple[int, ...], ...]:
    shapes = []
    for entry in entries or ():
        for dims in (entry.values() if isinstance(entry, dict) else ()):
            shapes.append(tuple(int(d) for d in dims))
    return tuple(shapes)


def parse_events(events: list[dict]) -> RunProfile:
    """A profile from ORT's event list: the first run dropped, node times per run over the rest."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    timed = runs[1:] if len(runs) > 1 else runs
    if not timed:
        return RunProfile((), 0.0)
    first_ts = timed[0]["ts"]
    totals: dict[str, float] = {}
    first_seen: dict[str, dict] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time") or event["ts"] < first_ts:
            continue
        totals[name] = totals.get(name, 0.0) + event["dur"] / 1e3
        first_seen.setdefault(name, event.get("args", {}))
    nodes = []
    for name, total_ms in totals.items():
        args = first_seen[name]
        nodes.append(NodeTime(name.removesuffix("_kernel_time"), args.get("op_name", "?"), total_ms / len(timed),
                              int(args.get("parameter_size", 0) or 0), _shapes(args.get("input_type_shape")),
                              _shapes(args.get("output_type_shape"))))
    return RunProfile(tuple(nodes), sum(e["dur"] for e in timed) / 1e3 / len(timed))


def profile_runs(path: Path, inputs: dict[str, np.ndarray] | tuple, *, runs: int = 5,
                 threads: int | None = None) -> RunProfile:
    """Run the ONNX file at ``path`` once to warm up and ``runs`` times more, profiled; ``inputs``: feeds by
    name, or tensors in the graph's input order.

    The profiler's JSON goes to a temporary directory that is removed."""
    from tfcompile.backends.ort import OrtModel

    with tempfile.TemporaryDirectory(prefix="tfcompile-ort-profile-") as tmp:
        model = OrtModel(path, threads=threads, profile_prefix=str(Path(tmp) / "run"))
        feeds = inputs if isinstance(inputs, dict) else model.feeds(inputs)
        for _ in range(runs + 1):
            model.session.run(None, feeds)
        events = json.loads(Path(model.session.end_profiling()).read_text())
    return parse_events(events)


def ms_by_op_type(profile: RunProfile) -> dict[str, float]:
    """Milliseconds per run in each ONNX op type, largest first."""
    totals: dict[str, float] = {}
    for node in profile.nodes:
        totals[node.op_type] = totals.get(node.op_type, 0.0) + node.ms_per_run
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


# ONNX op types by what they are to the cost model (``cost_models.attribution.GROUPS``).
MATMULS = {"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Conv", "FusedConv", "MatMulInteger", "QLinearMatMul",
           "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QGemm"}
NORMS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
         "SkipSimplifiedLayerNormalization", "RMSNormalization"}
ACTIVATIONS = {"Gelu", "FastGelu", "BiasGelu", "QuickGelu"}  # ORT's GELU and SiLU (x·sigmoid(x)) kernels
FUSED_ATTENTIONS = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}


def node_group(node: NodeTime, score_shapes: set[tuple[int, ...]]) -> str:
    """The group of ``cost_models.attribution.GROUPS`` an ORT node belongs to. ``score_shapes``: the shapes of
    the run's softmax inputs; a node that reads or writes a tensor of one of them works on attention scores."""
    if node.op_type in MATMULS:
        # q·kᵀ and p·v multiply two batched (rank >= 3) activations; a linear layer's weight is 2-D. Not
        # ``parameter_bytes``: ORT does not count a weight kept as external data.
        batched = [shape for shape in node.input_shapes[:2] if len(shape) >= 3]
        return "attention" if len(batched) == 2 else "weight matmuls"
    if node.op_type == "Softmax" or node.op_type in FUSED_ATTENTIONS:
        return "attention"
    if score_shapes & set(node.input_shapes + node.output_shapes):
        return "attention"
    if node.op_type in NORMS:
        return "norms"
    if node.op_type in ACTIVATIONS:
        return "activations"
    return "other ops"


def ms_by_group(profile: RunProfile) -> dict[str, float]:
    """Milliseconds per run in each of ``cost_models.attribution.GROUPS``."""
    return grouped_ms(profile, node_group, lambda node: node.op_type == "Softmax")


def grouped_ms(profile: RunProfile, group_of, is_softmax) -> dict[str, float]:
    """Milliseconds per run per group: ``group_of(node, score_shapes)`` names each node's, where
    ``score_shapes`` are the inputs' shapes of the nodes ``is_softmax`` picks; the run's time outside every
    node is between kernels."""
    from tfcompile.cost_models.attribution import GROUPS

    score_shapes = {shape for node in profile.nodes if is_softmax(node) for shape in node.input_shapes}
    totals = dict.fromkeys(GROUPS, 0.0)
    for node in profile.nodes:
        totals[group_of(node, score_shapes)] += node.ms_per_run
    totals["between kernels"] += profile.between_kernels_ms
    return totals
