"""Atomic output files: a reader sees the old files or the complete new ones.

Everything is written to a temporary name in the destination directory and
renamed into place only after it is complete; on failure (Ctrl-C included)
the temporary files are removed, the directories made for them are removed
again, and any existing output stays untouched. Files that belong together
(``model.onnx`` and ``report.json``) are renamed together, after all of them
are complete.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from tfcompile.environment import restored_environ
from tfcompile.errors import InvalidOptionError


@contextlib.contextmanager
def atomic_paths(*finals: Path) -> Iterator[tuple[Path, ...]]:
    """Temporary names beside ``finals``, each renamed onto its final name once the block completes."""
    finals = tuple(Path(f) for f in finals)
    made: list[Path] = []
    tmps: list[Path] = []
    try:
        for final in finals:
            made += _make_dirs(final.parent)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            # mkstemp makes the file private (0600); an output file gets the mode any new file would.
            os.fchmod(fd, 0o666 & ~_umask())
            os.close(fd)
            tmps.append(Path(tmp_name))
        yield tuple(tmps)
        for tmp, final in zip(tmps, finals):
            os.replace(tmp, final)
        made = []  # complete: the directories hold the outputs now
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    with atomic_paths(final) as (tmp,):
        yield tmp


@contextlib.contextmanager
def private_tempdir() -> Iterator[Path]:
    """One temporary folder for everything a run and its libraries put in the temporary directory.

    ONNX Runtime writes a session file and torch an Inductor cache folder there when first used;
    tfcompile's own work folders go there too. The folder is removed when the block ends, whether it
    completed, failed or was interrupted, so no run leaves anything behind in $TMPDIR.
    """
    previous_tempdir = tempfile.tempdir
    folder = Path(tempfile.mkdtemp(prefix="tfcompile-run-"))
    with restored_environ("TMPDIR"):
        os.environ["TMPDIR"], tempfile.tempdir = str(folder), str(folder)
        try:
            yield folder
        finally:
            tempfile.tempdir = previous_tempdir
            shutil.rmtree(folder, ignore_errors=True)


def in_private_tempdir(function):
    """``function`` run inside ``private_tempdir()``: for the library's entry points."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        with private_tempdir():
            return function(*args, **kwargs)
    return run


@contextlib.contextmanager
def directories_for(path: Path) -> Iterator[Path]:
    """Make ``path`` and its missing parents; remove the ones made again if the block fails."""
    made = _make_dirs(Path(path))
    try:
        yield Path(path)
    except BaseException:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def _make_dirs(path: Path) -> list[Path]:
    """Make ``path`` and its missing parents; the ones made, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    made = []
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        made.append(directory)
    return made


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
    _check_writable_below(path, option)


def check_output_file(text: str | os.PathLike, option: str = "-o") -> Path:
    """Refuse, before any work, a file name that would be written as something else or not at all.

    Checked on the text: ``Path("out/dir/")`` and ``Path("out/dir/.")`` both forget that a
    directory was meant, and the file would be named ``dir``.
    """
    text = os.fspath(text)
    path = Path(text)
    if (not text or text.endswith(("/", os.sep)) or path.is_dir()
            or os.path.basename(text.rstrip("/" + os.sep)) in (".", "..")):
        raise InvalidOptionError(f"{option} {text!r} is a directory; give the name of a file to write inside it")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise InvalidOptionError(f"{option} {text!r} exists and is not a regular file; name a file to write")
    _check_writable_below(path.parent, option, shown=path)
    return path


def _check_writable_below(path: Path, option: str, shown: Path | None = None) -> None:
    """The nearest existing directory at or above ``path`` must take a new file (tried, not guessed:
    root passes every permission check and a read-only file system fails none)."""
    shown = shown or path
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise InvalidOptionError(f"{option} {shown}: {existing} is a file, so no directory can be made below it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tfcompile-probe-", suffix=".tmp", dir=existing)
    except OSError as exc:
        raise InvalidOptionError(f"{option} {shown}: {existing} is not writable ({exc.strerror or exc})") from exc
    os.close(fd)
    os.unlink(probe)
