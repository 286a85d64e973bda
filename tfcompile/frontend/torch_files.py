"""Loading torch files: torch.export archives, TorchScript, state dicts, pickles.

Only a full pickle (a ``torch.save`` of an ``nn.Module``) needs unpickling,
which executes whatever code the file names; it is loaded only when the user
passes ``--trust-pickle``. Everything else is read with ``weights_only=True``
or with torch's own archive readers.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from tfcompile.errors import ModelLoadError, UntrustedPickleError, first_line

TRUST_FLAG = "--trust-pickle"


def load_exported_program(path: Path) -> torch.export.ExportedProgram:
    try:
        return torch.export.load(str(path))
    except (zipfile.BadZipFile, EOFError, RuntimeError, KeyError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: unreadable torch.export archive: {first_line(exc)}") from exc


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch asks users to move to torch.export
            return torch.jit.load(str(path), map_location="cpu", _restore_shapes=True)
    except (RuntimeError, zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{path}: unreadable TorchScript archive: {first_line(exc)}") from exc


def traced_input_specs(module: torch.jit.ScriptModule) -> list[tuple[str, tuple[int, ...], torch.dtype]] | None:
    """Names, shapes and dtypes a traced module was traced with (None if unknown).

    TorchScript archives keep the traced inputs' types, not their values; the
    module must be loaded with ``_restore_shapes=True`` for them to appear.
    """
    specs = []
    for value in list(module.graph.inputs())[1:]:  # the first input is the module itself
        tensor_type = value.type()
        sizes = tensor_type.sizes() if hasattr(tensor_type, "sizes") else None
        dtype = tensor_type.dtype() if hasattr(tensor_type, "dtype") else None
        if sizes is None or dtype is None or any(s is None for s in sizes):
            return None
        specs.append((value.debugName().split(".")[0], tuple(sizes), dtype))
    return specs


def load_torch_save(path: Path, *, trust_pickle: bool) -> object:
    """A state dict is returned without executing code; a module needs the flag."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{path} is a full pickle (it names Python objects such as a model class); "
                f"unpickling runs code from the file, so tfcompile loads it only with {TRUST_FLAG}. "
                "Safer: save it with torch.export.save (.pt2), safetensors or ONNX") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable torch.save file: {first_line(exc)}") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # arbitrary code ran; anything can come out of it
        raise ModelLoadError(f"{path}: unpickling failed: {type(exc).__name__}: {first_line(exc)}") from exc


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ModelLoadError(f"{path}: unreadable safetensors file: {first_line(exc)}") from exc
