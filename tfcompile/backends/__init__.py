"""Backends that lower a variant and measure it: ONNX Runtime and TVM Relax."""

BACKENDS = ("ort", "tvm", "torch")
