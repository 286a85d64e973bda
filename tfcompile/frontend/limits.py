"""How much memory an input may ask for, checked before anything is allocated.

A shape of 10^12 elements, a ``--batch`` of a billion or an archive that
claims terabytes would otherwise end in an out-of-memory kill (no message at
all) or a swap storm; asking first turns them into one clear error.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from tfcompile.errors import ShapeError


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
