"""Keep TVM's native log noise out of the terminal.

TVM's C++ ``LOG(WARNING)`` writes straight to this process's stderr (fd 2),
past Python's ``warnings`` and ``logging``, so no filter there reaches it.
Two of its warnings say nothing a tfcompile user can act on:

- ``Fast mode segfaults when there are out-of-bounds indices``: printed once
  when an embedding lookup (``take``) is legalised; the indices are the
  model's own token ids.
- ``Scope Saving:``: one line per memory scope (about a hundred for MiniLM)
  every time a Relax executable is serialised (``export_library``).

``filtered_stderr`` sends fd 2 to a temporary file for the length of one TVM
call and afterwards writes every line except those two back to stderr, so
TVM's errors and any other warning still reach the user. ``--verbose`` (or
``TFCOMPILE_VERBOSE=1``) turns the filter off.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator

# Set by `tfcompile --verbose`; read at each call, so a library user can set it too.
VERBOSE_ENV = "TFCOMPILE_VERBOSE"

# "[08:01:02] /project/src/runtime/vm/executable.cc:276: Warning: Scope Saving:global"
NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: Warning: "
                   r"(Scope Saving:|Fast mode segfaults when there are out-of-bounds indices)")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def drop_noise(text: str) -> str:
    """``text`` without TVM's known noise lines."""
    return "".join(line for line in text.splitlines(keepends=True) if not NOISE.match(line))


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Hold back fd 2 during the block; then pass on all of it but TVM's known noise.

    Keep the block to one TVM call: what it writes reaches the terminal only when the block ends
    (a crash inside it would lose that output).
    """
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                sink.seek(0)
                kept = drop_noise(sink.read().decode(errors="replace"))
                if kept:
                    sys.stderr.write(kept)
                    sys.stderr.flush()
    finally:
        os.close(saved)
