"""tfcompile: graph rewrites and hardware cost models for transformer inference.

The pipeline is: frontend (load + torch.export) -> passes (variants) ->
verification against the original -> cost models (predicted latency per target)
-> backends (ONNX Runtime / TVM: export, measure).
"""

__version__ = "0.1.0"

__all__ = ["optimize_model"]


def __getattr__(name: str):
    # Lazy, so `import tfcompile` (and the CLI's --help) does not pay for importing torch.
    if name == "optimize_model":
        from tfcompile.pipeline import optimize_model

        return optimize_model
    raise AttributeError(f"module 'tfcompile' has no attribute {name!r}")
