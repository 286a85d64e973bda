"""Recognise a model file by its content, never by its extension.

``tfcompile optimize model.pt`` may be handed a torch.export archive, a
TorchScript archive, a ``torch.save`` state dict or full pickle, ONNX or
safetensors. Zip archives are told apart by their member names; pickles and
protobufs by their first bytes.
"""

from __future__ import annotations

import enum
import json
import struct
import zipfile
from pathlib import Path

from tfcompile.errors import ModelLoadError, first_line


class FileKind(enum.Enum):
    EXPORTED_PROGRAM = "torch.export archive"
    TORCHSCRIPT = "TorchScript archive"
    TORCH_SAVE = "torch.save archive"  # a state dict or a full pickle: decided when loading
    RAW_PICKLE = "pickle"
    ONNX = "ONNX model"
    SAFETENSORS = "safetensors"


PICKLE_PROTOCOL_BYTE = 0x80


def detect(path: Path) -> FileKind:
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not head:
        raise ModelLoadError(f"{path}: the file is empty")
    if head.startswith(b"PK"):
        return _detect_zip(path)
    if head[0] == PICKLE_PROTOCOL_BYTE:
        return FileKind.RAW_PICKLE
    if _looks_like_safetensors(path, head):
        return FileKind.SAFETENSORS
    if _looks_like_onnx(path):
        return FileKind.ONNX
    raise ModelLoadError(
        f"{path}: not a recognised model file (expected a torch.export .pt2, TorchScript, "
        "torch.save, safetensors or ONNX file)")


def _detect_zip(path: Path) -> FileKind:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    # ValueError: member names that are not UTF-8; NotImplementedError: an unknown zip version.
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise ModelLoadError(f"{path}: truncated or corrupt zip archive ({first_line(exc)})") from exc
    tails = {name.split("/", 1)[-1] for name in names}
    if "archive_format" in tails or any(t.startswith("models/") and t.endswith(".json") for t in tails):
        return FileKind.EXPORTED_PROGRAM
    if "constants.pkl" in tails and any(t.startswith("code/") for t in tails):
        return FileKind.TORCHSCRIPT
    if "data.pkl" in tails:
        return FileKind.TORCH_SAVE
    raise ModelLoadError(f"{path}: a zip archive that is neither a torch.export, TorchScript nor torch.save file")


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len <= 0 or header_len > path.stat().st_size - 8 or head[8:9] != b"{":
        return False
    with path.open("rb") as f:
        f.seek(8)
        try:
            json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError):
            return False
    return True


def _looks_like_onnx(path: Path) -> bool:
    import onnx

    try:
        # External data is not followed here; the real load does that.
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf raises DecodeError and others on random bytes
        return False
    # Random bytes sometimes decode as an (almost empty) protobuf message.
    return model.ir_version > 0 and len(model.graph.node) > 0
