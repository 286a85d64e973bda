"""One way to lower a graph on any backend and get something to time.

``lower(graph, backend, workdir)`` returns a ``Lowered``: a zero-argument
callable that runs the model once on its example inputs (inputs converted
outside the timed call), and the outputs it computed, for checking.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from tfcompile.errors import TfcompileError
from tfcompile.graph import ModelGraph

BACKENDS = ("ort", "tvm", "torch")


def interleave_block(backend: str) -> int:
    """Timed runs per turn when variants on ``backend`` are timed round-robin (``measure_interleaved``).

    Each ORT session has its own thread pool whose idle workers spin: run by
    run, the session timed next shares the cores with the one before (minilm:
    22.6 ms alone, 59 ms round-robin with two other sessions). Without spinning
    every parallel op pays a thread wake-up, which on this VM cost more (33 ms).
    So ORT is timed in short blocks after an untimed run.
    """
    from tfcompile.backends.timing import ORT_BLOCK

    return ORT_BLOCK if backend == "ort" else 1


@dataclasses.dataclass
class Lowered:
    backend: str
    run: Callable[[], object]
    outputs: tuple[torch.Tensor, ...]
    onnx_path: Path | None = None
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. which TVM kernels ran untuned

    def remove_files(self) -> None:
        """Delete the exported ONNX file and its weights file, if any."""
        if self.onnx_path is not None:
            self.onnx_path.unlink(missing_ok=True)
            self.onnx_path.with_name(self.onnx_path.name + ".data").unlink(missing_ok=True)


def lower(graph: ModelGraph, backend: str, workdir: Path) -> Lowered:
    return lower_for_inputs(graph, backend, workdir, [graph.example_inputs])[0]


def lower_for_inputs(graph: ModelGraph, backend: str, workdir: Path,
                     input_sets: list[tuple[torch.Tensor, ...]]) -> list[Lowered]:
    """Lower ``graph`` once and run it on each of ``input_sets`` (same shapes, other values: the
    batches of a workload that share a shape), one ``Lowered`` per set."""
    if backend == "ort":
        from tfcompile.backends import ort

        path = ort.export_onnx(graph, Path(workdir) / f"{_safe(graph.name)}.onnx", external_data=True)
        model = ort.OrtModel(path)
        return [Lowered("ort", model.runner(inputs), model.run(inputs), path) for inputs in input_sets]
    if backend == "tvm":
        from tfcompile.backends import tvm as tvm_backend

        module = tvm_backend.compile_graph(graph)
        return [Lowered("tvm", module.runner(inputs), module.run(inputs), notes=[module.schedule_summary()])
                for inputs in input_sets]
    if backend == "torch":
        return [_torch_lowered(graph, inputs) for inputs in input_sets]
    raise TfcompileError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


def _torch_lowered(graph: ModelGraph, inputs: tuple[torch.Tensor, ...]) -> Lowered:
    def run():
        with torch.no_grad():
            return graph.gm(*inputs)

    return Lowered("torch", run, graph.run(inputs))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
