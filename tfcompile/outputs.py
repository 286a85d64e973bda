"""Atomic output files: a reader sees the old file or the complete new one.

Everything is written to a temporary name in the destination directory and
renamed into place only after it is complete; on failure the temporary file
is removed and any existing output stays untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from tfcompile.errors import InvalidOptionError


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    # mkstemp makes the file private (0600); an output file gets the mode any new file would.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def check_output_dir(path: Path, option: str = "-o") -> None:
    """Refuse, before any work, a directory that cannot be created or written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidOptionError(f"{option} {path}: is a file, not a directory; name a directory for the outputs")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InvalidOptionError(f"{option} {path}: {existing} is a file, so no directory can be made below it")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidOptionError(f"{option} {path}: {existing} is not writable")
