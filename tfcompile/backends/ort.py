"""ONNX export (torch.onnx dynamo exporter) and ONNX Runtime execution.

A variant is re-exported with torch.export, converted by the dynamo exporter
(the legacy TorchScript exporter cannot export transformers-5 GPT-2), checked
with ``onnx.checker`` and run in an ORT session with a fixed thread count.
Files for the user keep their weights inside the .onnx file (protobuf's 2 GB
limit is far above the zoo's models; larger models are refused with a clear
error); tfcompile's own measurement copies keep them in a ``.data`` file
beside it, which is faster to write and to load.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from tfcompile.backends.onnx_translations import TRANSLATIONS
from tfcompile.backends.timing import Measurement, measure
from tfcompile.errors import BackendError, first_line
from tfcompile.graph import ModelGraph, clone, fetch_attr, to_exported_program
from tfcompile.structure import unique_attr_name
from tfcompile.outputs import atomic_path, directories_for

PROTOBUF_LIMIT_BYTES = 2 * 1024**3 - 64 * 1024**2


def export_onnx(graph: ModelGraph, path: Path, *, opset: int | None = None, external_data: bool = False,
                dynamic_shapes: tuple[dict[int, torch.export.Dim], ...] | None = None) -> Path:
    """Write ``graph`` as ONNX to ``path`` atomically and check it.

    ``dynamic_shapes``: one ``{dim: torch.export.Dim}`` per input of a graph traced
    with symbolic shapes (``backends.dynamic_export``); the ONNX file's dimensions
    then carry the Dims' names (``batch``, ``seq``) instead of fixed sizes.

    ``external_data``: weights go to ``<path>.data`` beside the graph. That is
    what tfcompile's own measurement copies use: writing raw tensors and
    loading them into ONNX Runtime takes about 3 s less per GPT-2-sized
    export than serialising them into the protobuf. Files handed to the user
    keep their weights inside (``single_file`` converts).
    """
    import onnx

    if graph.parameter_bytes() > PROTOBUF_LIMIT_BYTES and not external_data:
        raise BackendError(f"{graph.name}: {graph.parameter_bytes() / 1e9:.1f} GB of weights exceed what one "
                           ".onnx file can hold")
    program = to_exported_program(_without_exporter_names(graph), dynamic_shapes)
    path = Path(path)
    with _atomic_onnx(path, external_data) as tmp:
        try:
            with _quiet():
                onnx_program = torch.onnx.export(program, (), dynamo=True, input_names=graph.input_names,
                                                 output_names=graph.output_names, opset_version=opset,
                                                 optimize=True, verbose=False,
                                                 custom_translation_table=TRANSLATIONS)
                onnx_program.save(str(tmp), external_data=external_data)
        except Exception as exc:  # the exporter raises many types; one line for the user
            raise BackendError(f"ONNX export of {graph.name} failed: {type(exc).__name__}: {first_line(exc)}") from exc
        if dynamic_shapes:
            _name_dimensions(tmp, _symbol_names(program, dynamic_shapes))
        try:
            onnx.checker.check_model(str(tmp), full_check=False)
        except onnx.checker.ValidationError as exc:
            raise BackendError(f"exported ONNX for {graph.name} fails onnx.checker: {first_line(exc)}") \
                from exc
    return path


def _symbol_names(program: torch.export.ExportedProgram, dynamic_shapes: tuple) -> dict[str, str]:
    """The exporter's symbol for each dynamic input dimension (``s13``) -> the Dim's name (``batch``)."""
    user = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    fakes = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    names = {}
    for input_name, spec in zip(user, dynamic_shapes):
        for index, dim in (spec or {}).items():
            names[str(fakes[input_name].shape[index])] = dim.__name__
    return names


def _name_dimensions(path: Path, names: dict[str, str]) -> None:
    """Rename symbolic dimensions in the file's inputs, outputs and value infos (weights stay where they are)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    onnx.save(model, str(path))


@contextlib.contextmanager
def _atomic_onnx(path: Path, external_data: bool):
    """A temporary name for an ONNX file; with external data, a private directory whose
    ``<name>.data`` is moved beside ``path`` before the graph itself (the graph names its data file)."""
    if not external_data:
        with atomic_path(path) as tmp:
            yield tmp
        return
    with directories_for(path.parent), \
            tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmpdir:
        tmp = Path(tmpdir) / path.name
        yield tmp
        os.replace(tmp.with_name(path.name + ".data"), path.with_name(path.name + ".data"))
        os.replace(tmp, path)


def single_file(source: Path, destination: Path) -> Path:
    """Write the ONNX model at ``source`` (weights inside or beside it) to ``destination`` as one file, atomically."""
    import onnx

    source, destination = Path(source), Path(destination)
    if not source.with_name(source.name + ".data").exists():
        with atomic_path(destination) as tmp:
            shutil.copyfile(source, tmp)
        return destination
    model = onnx.load(str(source))  # reads the external data in
    if model.ByteSize() > PROTOBUF_LIMIT_BYTES:
        raise BackendError(f"{source.name}: {model.ByteSize() / 1e9:.1f} GB exceed what one .onnx file can hold")
    with atomic_path(destination) as tmp:
        onnx.save(model, str(tmp))
    return destination


# The exporter names intermediate values val_0, val_1, ...; a weight that already has
# such a name (an ONNX file exported by torch, imported, then re-exported) would be
# defined twice in the new file.
_EXPORTER_VALUE_NAME = re.compile(r"^_?val_\d+$")


def _without_exporter_names(graph: ModelGraph) -> ModelGraph:
    """``graph``, or a clone whose weights named like exporter values are renamed."""
    clashing = {n.target for n in graph.nodes("get_attr") if _EXPORTER_VALUE_NAME.match(n.target)}
    if not clashing:
        return graph
    renamed = clone(graph)
    gm = renamed.gm
    new_names = {}
    for old in sorted(clashing):
        value = fetch_attr(gm, old)
        new = unique_attr_name(gm, "w_" + old)
        if isinstance(value, torch.nn.Parameter):
            gm.register_parameter(new, value)
        else:
            gm.register_buffer(new, value)
        new_names[old] = new
    for node in renamed.nodes("get_attr"):
        if node.target in new_names:
            node.target = new_names[node.target]
    gm.recompile()
    return renamed


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress and warnings; tfcompile shows its own."""
    sink = io.StringIO()
    previous = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("torch.onnx").setLevel(previous)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OrtModel:
    """An ONNX Runtime session over one exported file."""

    def __init__(self, path: Path, *, threads: int | None = None, spinning: bool = True,
                 profile_prefix: str | None = None, disabled_optimizers: tuple[str, ...] = ()):
        """``spinning=False``: idle worker threads sleep instead of spinning, which a session that
        shares the process with others needs (see ``backends.runner.lower``). ``profile_prefix``: ORT's
        profiler on, its JSON written there (``ort_profile``). ``disabled_optimizers``: ORT graph rewrites left
        out by name (benchmarks/ort_skip_layernorm.py)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=list(disabled_optimizers))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BackendError(f"ONNX Runtime cannot load {path}: {first_line(exc)}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.name = Path(path).stem

    def feeds(self, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
        return {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs)}

    def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        try:
            outputs = self.session.run(None, self.feeds(inputs))
        except Exception as exc:  # a model's own failure at run time, e.g. an index out of range
            raise BackendError(f"ONNX Runtime: {self.name}: run failed: {first_line(exc)}") from exc
        return tuple(torch.from_numpy(np.asarray(o)) for o in outputs)

    def runner(self, inputs: tuple[torch.Tensor, ...]):
        feeds = self.feeds(inputs)
        return lambda: self.session.run(None, feeds)


def measure_file(path: Path, inputs: tuple[torch.Tensor, ...], *, repeat: int = 10,
                 threads: int | None = None) -> Measurement:
    model = OrtModel(path, threads=threads)
    return measure(model.runner(inputs), backend="ort", repeat=repeat)
