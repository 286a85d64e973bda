"""Post-export precision lowering with ONNX Runtime's own tools.

- ``int8``: dynamic quantization (``onnxruntime.quantization.quantize_dynamic``):
  weights of MatMul/Gemm stored as int8, activations quantized per call.
- ``fp16``: ``onnxruntime.transformers.float16`` conversion of weights and
  compute, keeping fp32 inputs and outputs so callers are unchanged.

Both change the function, so the result is approximate: it is run in ONNX
Runtime against the torch reference and reported with a quality figure.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from tfcompile.errors import BackendError, first_line

MODES = ("none", "fp16", "int8")


def quantize(source: Path, destination: Path, mode: str) -> Path:
    import onnx

    if mode not in MODES or mode == "none":
        raise BackendError(f"unknown quantization {mode!r}; use fp16 or int8")
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            logging.getLogger("onnxruntime").setLevel(logging.ERROR)
            if mode == "int8":
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(str(source), str(destination), weight_type=QuantType.QInt8)
            else:
                from onnxruntime.transformers.float16 import convert_float_to_float16

                model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
                onnx.save(model, str(destination))
        onnx.checker.check_model(str(destination))
    except Exception as exc:  # the quantizers raise assorted errors on unusual graphs
        raise BackendError(f"{mode} quantization failed: {type(exc).__name__}: {first_line(exc)}") from exc
    return destination
