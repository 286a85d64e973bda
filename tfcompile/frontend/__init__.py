"""Load a model from any supported source and trace it to a ``ModelGraph``.

Sources, in the order they are tried:
- a built-in zoo name (``gpt2-small``, ``bert-base``, ``vit-base``, ``llama-tiny``, ``minilm``,
  ``tiny-decoder``);
- a Hugging Face model directory (config.json + safetensors);
- a file, recognised by content (see ``detect``): torch.export archive,
  TorchScript archive, state dict (+ ``--config``), safetensors (+ ``--config``),
  ONNX, or a full pickle (only with ``--trust-pickle``);
- ``package.module:factory``, a callable returning an ``nn.Module`` or
  ``(nn.Module, example_inputs)``;
- a Hugging Face hub id (``name`` or ``org/name``) already in the local hub
  cache, loaded as a model directory is (``hub_cache``; never downloaded).

Every graph keeps what a deployable export needs to trace it again with
symbolic batch and sequence dimensions (``ModelGraph.retrace``, see
``frontend.dynamic``): the module for modules, the archive's own dimensions
for ``.pt2`` and TorchScript, and for ONNX input the reason it stays static.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from tfcompile.errors import MAX_SEED, InvalidOptionError, ModelLoadError, ShapeError, TraceError, first_line
from tfcompile.frontend import detect, hf, hf_inputs, hub_cache, torch_files, zoo
from tfcompile.frontend.dynamic import module_source, program_source
from tfcompile.frontend.inputs import make_input, seeded_generator
from tfcompile.frontend.limits import check_fits_in_memory, deadline, quiet_library_logs, tensor_bytes
from tfcompile.graph import ModelGraph, RetraceSource, export_module, from_exported_program


FACTORY_PATTERN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
TRACE_HINT = ("give the input shapes the model expects (--input-shape NAME=DIMS[:DTYPE]), or a module:factory "
              "returning (module, example_inputs) that fixes them; data-dependent Python control flow cannot be "
              "traced (use torch.cond or take the branch out)")
ONNX_STATIC = "an ONNX input is imported at fixed shapes (--batch, --seq, --input-shape)"
# Token inputs are int64 ids plus a mask of the same shape.
TOKEN_INPUT_BYTES = 2 * 8


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
    # Seconds loading and tracing may take (a factory or a trace that never returns); None: no limit.
    timeout_s: float | None = None


def load_model(source: str | os.PathLike, options: LoadOptions = LoadOptions()) -> ModelGraph:
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        raise InvalidOptionError(f"model {source!r}: a zoo name, a model file or directory, or module:factory")
    source = os.fspath(source)
    check_options(options)
    try:
        with quiet_library_logs(), deadline(options.timeout_s, f"loading and tracing {source}"):
            graph = _load(source, options)
    except TraceError as exc:
        raise TraceError(f"{str(exc).rstrip('.')}; {TRACE_HINT}") from exc
    check_tensor_outputs(graph)
    check_activation_memory(graph)
    return graph


def _load(source: str, options: LoadOptions) -> ModelGraph:
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
    if hub_cache.is_hub_id(source):
        cached = hub_cache.find(source)
        return _trace_module(_wrap_hf(hub_cache.load(cached)), cached.name, options,
                             info={"source": "hf-hub-cache", "hub_id": source, "commit": cached.commit})
    zoo_names = ", ".join(zoo.ZOO)
    raise ModelLoadError(f"{source}: no such file, directory or zoo model (zoo: {zoo_names}), nor a Hugging Face "
                         "hub id (NAME or ORG/NAME)")


def load_causal_lm(source: str | os.PathLike, options: LoadOptions = LoadOptions()) -> tuple[torch.nn.Module, str]:
    """A Hugging Face causal LM and its name, for generation (``optimize --generate``): a zoo decoder, a model
    directory or a hub id in the local cache. Other sources hold one traced graph, with no cache to trace."""
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        raise InvalidOptionError(f"model {source!r}: a zoo decoder, a Hugging Face model directory or hub id")
    source = os.fspath(source)
    check_options(options)
    path = Path(source)
    with quiet_library_logs(), deadline(options.timeout_s, f"loading {source}"):
        if source in zoo.ZOO and not path.exists():
            model, name = zoo.build(source, seed=options.seed, config_overrides=options.config_overrides).model, source
        elif path.is_dir():
            model, name = hf.load_directory(path), path.name
        elif not path.exists() and hub_cache.is_hub_id(source):
            model, name = hub_cache.load(hub_cache.find(source)), source
        else:
            raise ModelLoadError(f"{source}: --generate traces a Hugging Face causal LM's prefill and decode step "
                                 "with its KV cache; give a zoo decoder (gpt2-small, llama-tiny), a model directory "
                                 "or a hub id (a file or factory holds one forward pass, with no cache to trace)")
    if not (callable(getattr(model, "can_generate", None)) and model.can_generate()):
        raise ModelLoadError(f"{source}: {type(model).__name__} is not a causal LM that generates "
                             "(--generate needs a ...ForCausalLM model)")
    return model.eval(), name


def check_options(options: LoadOptions) -> None:
    """The library's entry checks what the CLI's option types check, for callers that skip the CLI."""
    if not isinstance(options, LoadOptions):
        raise InvalidOptionError(f"load options {options!r}: a tfcompile.frontend.LoadOptions")
    for flag, value in (("--batch", options.batch), ("--seq", options.seq)):
        if not _is_int(value) or value <= 0:
            raise ShapeError(f"{flag} must be a positive integer (got {value!r})")
    if not _is_int(options.seed) or not 0 <= options.seed <= MAX_SEED:
        raise InvalidOptionError(f"--seed must be an integer from 0 to {MAX_SEED} (got {options.seed!r})")
    if options.timeout_s is not None and not (isinstance(options.timeout_s, (int, float)) and options.timeout_s > 0):
        raise InvalidOptionError(f"--timeout must be a positive number of seconds (got {options.timeout_s!r})")
    for name, shape in (options.input_shapes or {}).items():
        if not shape or not all(_is_int(d) and d > 0 for d in shape):
            raise ShapeError(f"--input-shape {name}: every dimension must be a positive integer (got {shape})")
    check_fits_in_memory(tensor_bytes((options.batch, options.seq), TOKEN_INPUT_BYTES),
                         f"--batch {options.batch} --seq {options.seq}", "lower --batch or --seq")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    fakes = {n.name: n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"}
    _check_input_names(name, names, options)
    stored = _stored_inputs(program, names, fakes)
    if options.input_shapes is None and stored is not None:
        inputs = stored
    else:
        shapes = {k: (options.input_shapes or {}).get(k) or _concrete_shape(name, k, fakes[k]) for k in names}
        inputs = _inputs_for(names, shapes, {k: (options.input_dtypes or {}).get(k) or fakes[k].dtype for k in names},
                             options, int_high=_embedding_rows(program))
    traced_at = [tuple(fakes[k].shape) for k in names]
    retrace = program_source(_retraceable(program), program, names, "the .pt2 archive")
    if any(_is_symbolic(fakes[k]) for k in names) or traced_at != [tuple(t.shape) for t in inputs]:
        # Symbolic dimensions reach the cost model and the report as SymInts/SymFloats, and a static
        # export only runs at its traced shapes: re-trace at the concrete inputs either way.
        return _trace_module(_retraceable(program), name, options, inputs=inputs, input_names=names,
                             info={"source": "pt2"}, retrace=retrace)
    return from_exported_program(program, inputs, name=name, input_names=names, info={"source": "pt2"},
                                 retrace=retrace)


def _retraceable(program: torch.export.ExportedProgram) -> torch.nn.Module:
    """program.module() overrides .train()/.eval() on the instance to raise; tracing calls .eval()."""
    module = program.module()
    for method in ("train", "eval"):
        module.__dict__.pop(method, None)
    return module


def _stored_inputs(program: torch.export.ExportedProgram, names: list[str], fakes: dict) -> tuple | None:
    """The archive's sample inputs when they are tensors that fit the graph's inputs, else None."""
    stored = program.example_inputs[0] if program.example_inputs else None
    if not isinstance(stored, (tuple, list)) or len(stored) != len(names):
        return None
    for tensor, key in zip(stored, names):
        fake = fakes[key]
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != fake.dtype or tensor.dim() != fake.dim():
            return None
        if any(isinstance(d, int) and d != t for d, t in zip(fake.shape, tensor.shape)):
            return None
    return tuple(stored)


def _is_symbolic(fake: torch.Tensor) -> bool:
    return not all(isinstance(d, int) for d in fake.shape)


def _concrete_shape(model: str, input_name: str, fake: torch.Tensor) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in fake.shape)
    except Exception as exc:  # an unbacked symbolic size has no value to fall back on
        raise ShapeError(f"{model}: input {input_name!r} has a dynamic shape {tuple(fake.shape)} and no stored "
                         f"example; give --input-shape {input_name}=DIMS") from exc


def _check_input_names(model: str, names: list[str], options: LoadOptions) -> None:
    unknown = sorted(set(options.input_shapes or {}) - set(names))
    if unknown:
        raise ShapeError(f"{model}: --input-shape names {', '.join(unknown)}, but the model's inputs are "
                         f"{', '.join(names)}")


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
        raise ModelLoadError(f"{path}: TorchScript could not be converted to torch.export: "
                             f"{type(exc).__name__}: {first_line(exc)}") from exc
    user_inputs = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    retrace = program_source(_retraceable(program), program, user_inputs, "the TorchScript module")
    if any(_is_symbolic(n.meta["val"]) for n in program.graph.nodes
           if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)):
        # The converter leaves the batch dimension symbolic; the cost model and the report need numbers.
        return _trace_module(_retraceable(program), path.stem, options, inputs=inputs,
                             info={"source": "torchscript"}, retrace=retrace)
    return from_exported_program(program, inputs, name=path.stem, info={"source": "torchscript"},
                                 retrace=retrace)


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
                         info={"source": "onnx"}, retrace=RetraceSource(None, static_reason=ONNX_STATIC))


def _load_factory(source: str, options: LoadOptions) -> ModelGraph:
    """Run the user's own factory (naming it is the consent); whatever it raises is reported in one line."""
    module_name, _, attr = source.partition(":")
    factory = _import_factory(source, module_name, attr)
    made = _call_factory(source, factory)
    inputs = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, inputs = made
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        if not all(isinstance(t, torch.Tensor) for t in inputs):
            kinds = ", ".join(sorted({type(t).__name__ for t in inputs}))
            raise ModelLoadError(f"{source}: the factory's example inputs must be tensors (got {kinds})")
    if not isinstance(made, torch.nn.Module):
        raise ModelLoadError(f"{source}: the factory returned {type(made).__name__}, not an nn.Module "
                             "(or a tuple of an nn.Module and its example inputs)")
    return _trace_module(_wrap_if_hf(made), attr, options, inputs=inputs, info={"source": "factory"})


def _import_factory(source: str, module_name: str, attr: str):
    # Like `python -m`, a factory in the user's working directory must be importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ModelLoadError(f"{source}: no module named {module_name!r} (run tfcompile from the directory "
                                 "that holds it, or install it)") from exc
        raise ModelLoadError(f"{source}: importing {module_name} failed: {first_line(exc)}") from exc
    except SyntaxError as exc:
        raise ModelLoadError(f"{source}: {exc.filename}:{exc.lineno}: syntax error: {exc.msg}") from exc
    except (Exception, SystemExit) as exc:  # the module's own code raised while importing
        raise ModelLoadError(f"{source}: importing {module_name} raised {type(exc).__name__}: "
                             f"{first_line(exc)}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelLoadError(f"{source}: module {module_name} has no attribute {attr!r}")
    if not callable(factory):
        raise ModelLoadError(f"{source}: {attr} is a {type(factory).__name__}, not a callable factory")
    return factory


def _call_factory(source: str, factory):
    try:
        inspect.signature(factory).bind()
    except TypeError as exc:
        raise ModelLoadError(f"{source}: the factory needs arguments ({first_line(exc)}); tfcompile calls it with "
                             "none: give a function without required parameters") from exc
    except ValueError:  # builtins without a signature: just call them
        pass
    try:
        return factory()
    except (Exception, SystemExit) as exc:
        raise ModelLoadError(f"{source}: the factory raised {type(exc).__name__}: {first_line(exc)}") from exc


def _wrap_hf(model: torch.nn.Module) -> hf.TensorIO:
    names, fields = hf.io_spec(model)
    return hf.TensorIO(model, names, fields)


def _wrap_if_hf(module: torch.nn.Module) -> torch.nn.Module:
    import transformers

    return _wrap_hf(module) if isinstance(module, transformers.PreTrainedModel) else module


def _trace_module(module: torch.nn.Module, name: str, options: LoadOptions, *,
                  inputs: tuple[torch.Tensor, ...] | None = None, input_names: list[str] | None = None,
                  info: dict[str, Any] | None = None, retrace: RetraceSource | None = None) -> ModelGraph:
    if inputs is None:
        names = input_names or getattr(module, "input_names", None) or list(options.input_shapes or [])
        if not names:
            raise ShapeError(f"{name}: tfcompile cannot guess this module's inputs; give --input-shape NAME=DIMS")
        _check_input_names(name, names, options)
        inputs = _inputs_for(names, _default_shapes(module, names, options),
                             {**_default_dtypes(module, names), **(options.input_dtypes or {})}, options,
                             int_high=_vocab_size(module))
        input_names = names
    _check_positions(module, name, inputs, input_names or [])
    output_names = getattr(module, "output_fields", None) or None
    if getattr(module, "pooling", None):
        output_names = ["sentence_embedding"]
    graph = export_module(module, inputs, name=name, input_names=input_names, output_names=output_names, info=info)
    graph.retrace = retrace or module_source(module, graph.input_names, inputs)
    return graph


def check_tensor_outputs(graph: ModelGraph) -> None:
    """Verification and export compare tensors; a forward that returns None or numbers is the model's fault."""
    output = next(node for node in graph.gm.graph.nodes if node.op == "output")
    values, _ = torch.utils._pytree.tree_flatten(output.args[0])
    kinds = {type(v.meta.get("val") if isinstance(v, torch.fx.Node) else v).__name__ for v in values}
    bad = sorted(k for k in kinds if k not in ("FakeTensor", "Tensor", "Parameter"))
    if not values or bad:
        found = ", ".join(bad) if bad else "nothing"
        raise TraceError(f"{graph.name}: forward returns {found}; tfcompile needs a tensor or a tuple of tensors "
                         "(return the logits or hidden states)")


def check_activation_memory(graph: ModelGraph) -> None:
    """The traced graph knows every intermediate's shape: refuse before running one that cannot fit."""
    largest, where = 0, None
    for node in graph.gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and all(isinstance(d, int) for d in value.shape):
            nbytes = tensor_bytes(tuple(value.shape), value.element_size())
            if nbytes > largest:
                largest, where = nbytes, node.name
    if where is not None:
        check_fits_in_memory(largest, f"{graph.name}: the intermediate tensor {where}",
                             "lower --batch or --seq (or the --input-shape dimensions)")


def _default_shapes(module: torch.nn.Module, names: list[str], options: LoadOptions) -> dict[str, tuple[int, ...]]:
    """Shapes the model's config and forward give (``hf_inputs``); (batch, seq) where they say nothing."""
    shapes = dict(options.input_shapes or {})
    inner = getattr(module, "model", None)
    for name in names:
        if name not in shapes:
            shapes[name] = hf_inputs.input_shape(inner, name, options.batch, options.seq) \
                or (options.batch, options.seq)
    return shapes


def _default_dtypes(module: torch.nn.Module, names: list[str]) -> dict[str, torch.dtype]:
    return {name: hf_inputs.input_dtype(getattr(module, "model", None), name) for name in names}


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
