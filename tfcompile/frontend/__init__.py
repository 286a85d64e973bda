"""Load a model from any supported source and trace it to a ``ModelGraph``.

Sources, in the order they are tried:
- a built-in zoo name (``gpt2-small``, ``bert-base``, ``vit-base``, ``llama-tiny``, ``minilm``);
- a Hugging Face model directory (config.json + safetensors);
- a file, recognised by content (see ``detect``): torch.export archive,
  TorchScript archive, state dict (+ ``--config``), safetensors (+ ``--config``),
  ONNX, or a full pickle (only with ``--trust-pickle``);
- ``package.module:factory``, a callable returning an ``nn.Module`` or
  ``(nn.Module, example_inputs)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from tfcompile.errors import ModelLoadError, ShapeError
from tfcompile.frontend import detect, hf, torch_files, zoo
from tfcompile.frontend.inputs import make_input, seeded_generator
from tfcompile.graph import ModelGraph, export_module, from_exported_program


FACTORY_PATTERN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    batch: int = 1
    seq: int = 128
    # Explicit shapes (and optionally dtypes) per input name; they win over batch/seq.
    input_shapes: dict[str, tuple[int, ...]] | None = None
    input_dtypes: dict[str, torch.dtype] | None = None
    trust_pickle: bool = False
    config: Path | None = None
    seed: int = 0
    # Shrinks a zoo model (tests); ignored for other sources.
    config_overrides: dict[str, Any] | None = None


def load_model(source: str, options: LoadOptions = LoadOptions()) -> ModelGraph:
    if options.batch <= 0 or options.seq <= 0:
        raise ShapeError(f"--batch and --seq must be positive (got batch={options.batch}, seq={options.seq})")
    path = Path(source)
    if source in zoo.ZOO and not path.exists():
        module = zoo.build(source, seed=options.seed, config_overrides=options.config_overrides)
        text = None if options.input_shapes else zoo.real_text_inputs(source, options.batch, options.seq, options.seed)
        return _trace_module(module, source, options, inputs=text, input_names=module.input_names if text else None,
                             info={"zoo": source, "kind": zoo.ZOO[source].kind,
                                   **({"inputs": "real English text"} if text else {})})
    if path.is_dir():
        return _trace_module(_wrap_hf(hf.load_directory(path)), path.name, options, info={"source": "hf-dir"})
    if path.is_file():
        return _load_file(path, options)
    if FACTORY_PATTERN.fullmatch(source):
        return _load_factory(source, options)
    zoo_names = ", ".join(zoo.ZOO)
    raise ModelLoadError(f"{source}: no such file, directory or zoo model (zoo: {zoo_names})")


def _load_file(path: Path, options: LoadOptions) -> ModelGraph:
    kind = detect.detect(path)
    name = path.stem
    if kind is detect.FileKind.EXPORTED_PROGRAM:
        program = torch_files.load_exported_program(path, trust_pickle=options.trust_pickle)
        return _from_program(program, name, options)
    if kind is detect.FileKind.TORCHSCRIPT:
        return _from_torchscript(path, options)
    if kind is detect.FileKind.ONNX:
        return _from_onnx(path, options)
    if kind is detect.FileKind.SAFETENSORS:
        state = torch_files.load_safetensors(path)
        return _from_state_dict(state, path, options)
    loaded = torch_files.load_torch_save(path, trust_pickle=options.trust_pickle)
    if isinstance(loaded, torch.nn.Module):
        return _trace_module(_wrap_if_hf(loaded), name, options, info={"source": "pickle"})
    if isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return _from_state_dict(loaded, path, options)
    raise ModelLoadError(f"{path}: holds a {type(loaded).__name__}, not a model or a state dict")


def _from_state_dict(state: dict[str, torch.Tensor], path: Path, options: LoadOptions) -> ModelGraph:
    config = options.config or (path.parent / "config.json" if (path.parent / "config.json").is_file() else None)
    if config is None:
        raise ModelLoadError(f"{path} is a bare state dict: pass --config CONFIG.json (a Hugging Face config) "
                             "so tfcompile knows the architecture, or put config.json beside it")
    model = hf.build_from_config(Path(config), state)
    return _trace_module(_wrap_hf(model), path.stem, options, info={"source": "state-dict"})


def _from_program(program: torch.export.ExportedProgram, name: str, options: LoadOptions) -> ModelGraph:
    placeholders = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    names = [s.arg.name for s in placeholders]
    stored = program.example_inputs[0] if program.example_inputs else None
    if options.input_shapes is None and stored is not None:
        inputs = tuple(stored)
    else:
        fakes = {n.name: n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"}
        inputs = _inputs_for(names, {k: tuple(int(d) for d in fakes[k].shape) for k in names},
                             {k: fakes[k].dtype for k in names}, options, int_high=_embedding_rows(program))
        if stored is not None and [t.shape for t in stored] != [t.shape for t in inputs]:
            # A static export only runs at its traced shapes; try a re-trace at the new ones.
            return _trace_module(program.module(), name, options, inputs=inputs, input_names=names)
    return from_exported_program(program, inputs, name=name, input_names=names, info={"source": "pt2"})


def _from_torchscript(path: Path, options: LoadOptions) -> ModelGraph:
    from torch._export.converter import TS2EPConverter

    module = torch_files.load_torchscript(path)
    if options.input_shapes:
        names = list(options.input_shapes)
        inputs = _inputs_for(names, options.input_shapes, options.input_dtypes or {}, options)
    else:
        specs = torch_files.traced_input_specs(module)
        if specs is None:
            raise ShapeError(f"{path}: this TorchScript module records no input shapes; give --input-shape")
        inputs = _inputs_for([n for n, _, _ in specs], {n: s for n, s, _ in specs},
                             {n: d for n, _, d in specs}, options)
    try:
        program = TS2EPConverter(module, inputs).convert()
    except Exception as exc:  # the converter raises whatever the TorchScript op it met raises
        raise ModelLoadError(f"{path}: TorchScript could not be converted to torch.export: {exc}") from exc
    return from_exported_program(program, inputs, name=path.stem, info={"source": "torchscript"})


def _from_onnx(path: Path, options: LoadOptions) -> ModelGraph:
    import onnx

    from tfcompile.frontend.onnx_import import import_onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise ModelLoadError(f"{path}: unreadable ONNX file: {exc}") from exc
    imported = import_onnx(model, batch=options.batch, seq=options.seq, input_shapes=options.input_shapes,
                           seed=options.seed)
    return export_module(imported.module, imported.example_inputs, name=path.stem,
                         input_names=imported.input_names, output_names=imported.output_names,
                         info={"source": "onnx"})


def _load_factory(source: str, options: LoadOptions) -> ModelGraph:
    module_name, _, attr = source.partition(":")
    # Like `python -m`, a factory in the user's working directory must be importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"{source}: cannot import factory: {exc}") from exc
    made = factory()
    inputs = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, inputs = made
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not isinstance(made, torch.nn.Module):
        raise ModelLoadError(f"{source}: the factory returned {type(made).__name__}, not an nn.Module")
    return _trace_module(_wrap_if_hf(made), attr, options, inputs=inputs, info={"source": "factory"})


def _wrap_hf(model: torch.nn.Module) -> hf.TensorIO:
    names, fields = hf.io_spec(model)
    return hf.TensorIO(model, names, fields)


def _wrap_if_hf(module: torch.nn.Module) -> torch.nn.Module:
    import transformers

    return _wrap_hf(module) if isinstance(module, transformers.PreTrainedModel) else module


def _trace_module(module: torch.nn.Module, name: str, options: LoadOptions, *,
                  inputs: tuple[torch.Tensor, ...] | None = None, input_names: list[str] | None = None,
                  info: dict[str, Any] | None = None) -> ModelGraph:
    if inputs is None:
        names = input_names or getattr(module, "input_names", None) or list(options.input_shapes or [])
        if not names:
            raise ShapeError(f"{name}: tfcompile cannot guess this module's inputs; give --input-shape NAME=DIMS")
        inputs = _inputs_for(names, _default_shapes(module, names, options), options.input_dtypes or {}, options,
                             int_high=_vocab_size(module))
        input_names = names
    _check_positions(module, name, inputs, input_names or [])
    output_names = getattr(module, "output_fields", None) or None
    if getattr(module, "pooling", None):
        output_names = ["sentence_embedding"]
    return export_module(module, inputs, name=name, input_names=input_names, output_names=output_names, info=info)


def _default_shapes(module: torch.nn.Module, names: list[str], options: LoadOptions) -> dict[str, tuple[int, ...]]:
    shapes = dict(options.input_shapes or {})
    config = getattr(getattr(module, "model", None), "config", None)
    for name in names:
        if name in shapes:
            continue
        if name == "pixel_values":
            size = getattr(config, "image_size", 224)
            shapes[name] = (options.batch, getattr(config, "num_channels", 3), size, size)
        else:
            shapes[name] = (options.batch, options.seq)
    return shapes


def _inputs_for(names, shapes, dtypes, options: LoadOptions, int_high: int = 2) -> tuple[torch.Tensor, ...]:
    generator = seeded_generator(options.seed)
    result = []
    for name in names:
        if name not in shapes:
            raise ShapeError(f"no shape for input {name!r}; give --input-shape {name}=DIMS")
        dtype = dtypes.get(name) or (torch.float32 if name == "pixel_values" else torch.int64)
        try:
            result.append(make_input(name, tuple(shapes[name]), dtype, int_high=int_high, generator=generator))
        except ValueError as exc:
            raise ShapeError(str(exc)) from exc
    return tuple(result)


def _vocab_size(module: torch.nn.Module) -> int:
    config = getattr(getattr(module, "model", None), "config", None)
    return int(getattr(config, "vocab_size", 2) or 2)


def _embedding_rows(program: torch.export.ExportedProgram) -> int:
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.embedding.default:
            return int(node.args[0].meta["val"].shape[0])
    return 2


def _check_positions(module: torch.nn.Module, name: str, inputs, input_names: list[str]) -> None:
    inner = getattr(module, "model", None)
    limit = hf.max_positions(inner) if inner is not None else None
    if limit is None:
        return
    for input_name, tensor in zip(input_names, inputs):
        if input_name in ("input_ids", "attention_mask") and tensor.dim() >= 2 and tensor.shape[1] > limit:
            raise ShapeError(f"{name}: sequence length {tensor.shape[1]} exceeds the model's "
                             f"{limit} positions")
