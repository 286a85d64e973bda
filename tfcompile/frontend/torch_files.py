"""Loading torch files: torch.export archives, TorchScript, state dicts, pickles.

Only a full pickle (a ``torch.save`` of an ``nn.Module``) needs unpickling,
which executes whatever code the file names; it is loaded only when the user
passes ``--trust-pickle``. Everything else is read with ``weights_only=True``;
torch.export archives member by member (``pt2_archive``), TorchScript archives
after their code has been checked for file access (TorchScript runs an
archive's ``__setstate__`` methods while loading it).
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
import zlib
from pathlib import Path

import torch

from tfcompile.errors import ModelLoadError, UntrustedPickleError, first_line
from tfcompile.frontend import pt2_archive

TRUST_FLAG = pt2_archive.TRUST_FLAG

# TorchScript builtins that read or write files (torch.save, torch.from_file and their
# aten:: forms). TorchScript's unpickler only builds TorchScript classes, but a class's
# __setstate__ runs while the archive loads and may call any builtin.
TORCHSCRIPT_FILE_CALLS = re.compile(r"\b(save|from_file)\b")


def load_exported_program(path: Path, *, trust_pickle: bool = False) -> torch.export.ExportedProgram:
    return pt2_archive.load_exported_program(path, trust_pickle=trust_pickle)


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    members = check_torchscript_code(path)
    # Without stored traced inputs (a scripted module) torch warns from C++ straight onto stderr.
    restore_shapes = any(name.endswith("/traced_inputs.pkl") for name in members)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch asks users to move to torch.export
            return torch.jit.load(str(path), map_location="cpu", _restore_shapes=restore_shapes)
    except Exception as exc:  # the code was checked first: what torch still refuses is a damaged archive
        raise ModelLoadError(f"{path}: unreadable TorchScript archive: {type(exc).__name__}: "
                             f"{first_line(exc)}") from exc


def check_torchscript_code(path: Path) -> list[str]:
    """Refuse an archive whose TorchScript code touches files: it would run while loading. Returns the members."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if "/code/" not in f"/{info.filename}" or not info.filename.endswith(".py"):
                    continue
                text = archive.read(info).decode("utf-8", errors="replace")
                if match := TORCHSCRIPT_FILE_CALLS.search(text):
                    raise ModelLoadError(
                        f"{path}: the TorchScript code in archive member {info.filename} calls {match[1]}, which "
                        "reads or writes files (TorchScript runs such code while loading); tfcompile does not "
                        "load it. Export the model with torch.export.save instead")
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError, NotImplementedError,
            zlib.error) as exc:
        raise ModelLoadError(f"{path}: truncated or corrupt zip archive ({first_line(exc)})") from exc


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
            reason = pt2_archive.refusal_reason(exc)
            what = "a full pickle" if reason.startswith("it names") else "not a weights-only pickle"
            raise UntrustedPickleError(
                f"{path} is {what} ({reason}); unpickling runs code from the file, so tfcompile loads it only "
                f"with {TRUST_FLAG}. Safer: save it with torch.export.save (.pt2), safetensors or ONNX") from exc
    except Exception as exc:  # the restricted unpickler ran no code; whatever else it raises is damage
        raise ModelLoadError(f"{path}: unreadable torch.save file: {type(exc).__name__}: {first_line(exc)}") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as exc:
        # A pickle stores classes by module and name; one defined in the saving script's __main__ is not there.
        raise ModelLoadError(f"{path}: the pickle names a class this process cannot import ({first_line(exc)}); "
                             "pickles keep only the class's module and name, so give a module:factory that builds "
                             "the model, or save it with torch.export.save (.pt2)") from exc
    except Exception as exc:  # arbitrary code ran; anything can come out of it
        raise ModelLoadError(f"{path}: unpickling failed: {type(exc).__name__}: {first_line(exc)}") from exc


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ModelLoadError(f"{path}: unreadable safetensors file: {first_line(exc)}") from exc
