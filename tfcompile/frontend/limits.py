"""Limits at the input boundary: memory asked for before allocating, and quiet libraries.

A shape of 10^12 elements, a ``--batch`` of a billion or an archive that
claims terabytes would otherwise end in an out-of-memory kill (no message at
all) or a swap storm; asking first turns them into one clear error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Iterator

from tfcompile.errors import LoadTimeoutError, ShapeError


def memory_budget_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The memory the system says it can give now (MemAvailable), else all of RAM."""
    try:
        for line in meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemAvailable":
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**40  # unknown: only the absurd is refused


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(count) < 1024 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PB"


def tensor_bytes(shape: tuple[int, ...], element_size: int) -> int:
    return math.prod(int(d) for d in shape) * element_size


def check_fits_in_memory(nbytes: int, what: str, hint: str) -> None:
    """Refuse an allocation that cannot fit before torch tries it."""
    budget = memory_budget_bytes()
    if nbytes > budget:
        raise ShapeError(f"{what} needs {human_bytes(nbytes)}, more than the {human_bytes(budget)} of memory "
                         f"available; {hint}")


@contextlib.contextmanager
def quiet_library_logs() -> Iterator[None]:
    """torch logs and prints tracebacks and generated code before it raises; the user gets tfcompile's one line.

    Loggers of torch and transformers set their own levels, so only disabling
    logging as a whole silences them; the previous setting comes back after.
    ``TFCOMPILE_DEBUG=1`` lets everything through.
    """
    if os.environ.get("TFCOMPILE_DEBUG") == "1":
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Stop ``what`` with one clear error after ``seconds`` (a factory or trace that never returns).

    SIGALRM interrupts Python code between bytecodes, so a loop in a factory
    stops at once and a long torch kernel at its end. Signals reach only the
    main thread; elsewhere (and with no limit) this does nothing.
    """
    if seconds is None or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "setitimer"):
        yield
        return

    message = (f"{what} took longer than {seconds:g} s; stopped (raise --timeout if it is just slow, or check "
               "the factory for a loop that never ends)")
    expired = []

    def expire(_signum, _frame):
        expired.append(True)
        raise LoadTimeoutError(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Exception as exc:
        # Loaders wrap what they catch in their own errors; the timeout is still the cause.
        if expired and not isinstance(exc, LoadTimeoutError):
            raise LoadTimeoutError(message) from exc
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
