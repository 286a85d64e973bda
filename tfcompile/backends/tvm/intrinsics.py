"""Import TVM's tensor intrinsics in seconds instead of minutes.

MetaSchedule imports ``tvm.s_tir.tensor_intrin``, which defines about 500
TVMScript functions at import time. Each ``@T.prim_func`` calls
``inspect.stack()``, and for every frame of the import machinery (frozen
modules with no source file) ``inspect`` searches all loaded modules for the
frame's source: about 70 s on this 2-core machine in a bare process, 110 s
with torch loaded, paid again by every builder and runner worker process.

TVMScript reads only the frames' objects and, for the decorator's caller, one
source line (to spot ``@I.ir_module`` classes), so a stack built from the
frame chain with ``linecache`` for the first frames gives it the same answers.
The replacement is in place only while the intrinsics import.
"""

from __future__ import annotations

import inspect
import linecache
import sys

_FRAMES_WITH_SOURCE = 3  # TVMScript looks at the code line of frames[2] at most


def _light_stack(context: int = 1) -> list[inspect.FrameInfo]:
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        line = linecache.getline(code.co_filename, frame.f_lineno) if len(frames) < _FRAMES_WITH_SOURCE else ""
        frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name,
                                        [line] if line else None, 0 if line else None))
        frame = frame.f_back
    return frames


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (once per process); also a worker-process initializer."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _light_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original
