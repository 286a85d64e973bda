"""Hugging Face hub ids (``name`` or ``org/name``) resolved from the local hub cache, never from the network.

``tfcompile optimize bert-base-uncased`` loads the model that ``hf download
bert-base-uncased`` (or transformers) left in the hub cache, exactly as a model
directory is loaded (``hf.load_directory``: config.json read without remote
code, weights read with transformers' weights-only loader and checked against
the config). The cache is found the way huggingface_hub finds it, read from the
environment at call time: ``HF_HUB_CACHE`` (or the legacy
``HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.

A hub id is a name, never a path: it must match the hub's repo id grammar
(ASCII letters, digits, ``-``, ``_``, ``.``; one optional ``/``; no ``..`` or
``--``) before anything on disk is looked at, and the snapshot huggingface_hub
returns must be ``snapshots/<40-hex commit>`` inside that repo's cache folder,
with every file in it (the cache's symlinks into ``blobs/``) resolving inside
that folder too: a ``refs/main`` or a symlink pointing elsewhere is refused.

Offline is forced while resolving and loading: ``HF_HUB_OFFLINE`` is set for
the duration (huggingface_hub's module constant too, which it read at import),
and the lookup itself passes ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from tfcompile.environment import restored_environ
from tfcompile.errors import ModelLoadError, first_line
from tfcompile.frontend import hf

# The hub's repo id grammar (huggingface_hub.utils.validate_repo_id), ASCII only; checked again by that function.
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID_PATTERN = re.compile(rf"(?:{_NAME}/)?{_NAME}", re.ASCII)
COMMIT_PATTERN = re.compile(r"[0-9a-f]{40}")
REVISION = "main"


@dataclasses.dataclass(frozen=True)
class CachedModel:
    hub_id: str
    commit: str
    snapshot: Path  # <cache>/models--org--name/snapshots/<commit>

    @property
    def name(self) -> str:
        return self.hub_id.rsplit("/", 1)[-1]


def is_hub_id(source: str) -> bool:
    """Whether ``source`` is a hub repo id by the hub's own grammar; looks at nothing on disk."""
    if not isinstance(source, str) or not HUB_ID_PATTERN.fullmatch(source):
        return False
    if ".." in source or "--" in source or source.endswith(".git"):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def cache_dir() -> Path:
    """The hub cache huggingface_hub would use, from the environment as it is now (not at import)."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"), "huggingface")
    home = os.path.expandvars(os.path.expanduser(home))
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def not_cached_message(source: str, cache: Path, detail: str = "") -> str:
    from tfcompile.frontend import zoo

    return (f"{source}: no such file or directory, zoo model ({', '.join(zoo.ZOO)}) or model in the local Hugging "
            f"Face cache ({cache}){detail}; tfcompile never downloads: on a machine with network run "
            f"`hf download {source}` and copy its hub cache here (or point HF_HUB_CACHE at it), or pass a "
            "directory holding config.json and model.safetensors")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """HF_HUB_OFFLINE on, in the environment and in huggingface_hub's constant, whatever the user set."""
    from huggingface_hub import constants

    saved_constant = constants.HF_HUB_OFFLINE
    with restored_environ("HF_HUB_OFFLINE"):
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = saved_constant


def find(source: str) -> CachedModel:
    """The cached snapshot of hub id ``source`` at ``main``, or a one-line ``ModelLoadError``."""
    if not is_hub_id(source):
        raise ModelLoadError(f"{source!r} is not a Hugging Face hub id (NAME or ORG/NAME of ASCII letters, digits, "
                             "'-', '_' and '.', without '..' or '--')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = cache_dir()
    storage = cache / f"models--{source.replace('/', '--')}"
    with offline():
        try:
            folder = snapshot_download(source, cache_dir=cache, revision=REVISION, local_files_only=True)
        except LocalEntryNotFoundError as exc:
            detail = ""
            if type(exc).__name__ == "IncompleteSnapshotError":
                detail = f" (its cached snapshot is incomplete: {first_line(exc)})"
            elif storage.is_dir():
                detail = f" ({storage.name} is there, but with no snapshot of its {REVISION} revision)"
            raise ModelLoadError(not_cached_message(source, cache, detail)) from exc
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # an unreadable ref or cache folder
            raise ModelLoadError(f"{source}: the Hugging Face cache entry {storage} is unreadable: "
                                 f"{type(exc).__name__}: {first_line(exc)}") from exc
    return _checked(source, storage, folder)


def _checked(source: str, storage: Path, folder: str) -> CachedModel:
    """The snapshot must be snapshots/<commit> of this repo's folder, and hold nothing that links out of it."""
    snapshot = Path(folder)
    commit = snapshot.name
    # snapshot_download joins whatever refs/main holds onto snapshots/: a ref of "../../x" points anywhere.
    if (not COMMIT_PATTERN.fullmatch(commit) or os.path.normpath(snapshot.parent) !=
            os.path.normpath(Path(cache_dir()).expanduser().resolve() / storage.name / "snapshots")):
        raise ModelLoadError(f"{source}: the Hugging Face cache's refs/{REVISION} for this model names "
                             f"{_ref_text(storage)!r}, not a commit of snapshots/ in {storage}: refused")
    root = storage.resolve()
    if not Path(os.path.realpath(snapshot)).is_relative_to(root):
        raise ModelLoadError(f"{source}: the cached snapshot {snapshot} links to {os.path.realpath(snapshot)}, "
                             f"outside the model's cache folder {storage}: refused")
    for directory, subdirs, files in os.walk(snapshot):
        for entry in [*subdirs, *files]:
            path = Path(directory, entry)
            target = Path(os.path.realpath(path))
            if not target.is_relative_to(root):
                raise ModelLoadError(f"{source}: the cached file {path.relative_to(snapshot)} links to {target}, "
                                     f"outside the model's cache folder {storage}: refused")
    return CachedModel(source, commit, snapshot)


def _ref_text(storage: Path) -> str:
    try:
        return (storage / "refs" / REVISION).read_text(errors="replace")[:80]
    except OSError:
        return "?"


def load(cached: CachedModel) -> torch.nn.Module:
    """The snapshot loaded exactly as a model directory is (``hf.load_directory``), offline."""
    with offline():
        return hf.load_directory(cached.snapshot)
