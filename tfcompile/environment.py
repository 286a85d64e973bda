"""Environment variables changed for one block and put back as they were, whatever happens inside."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def restored_environ(*names: str) -> Iterator[None]:
    """Run the block, then give each of ``names`` back the value it had before (unset if it was unset)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
