"""tfcompile: graph rewrites and hardware cost models for transformer inference.

The pipeline is: frontend (load + torch.export) -> passes (variants) ->
verification against the original -> cost models (predicted latency per target)
-> backends (ONNX Runtime / TVM: export, measure).
"""

__version__ = "0.1.0"
