"""Cost models: device specs as data, per-op formulas, roofline estimate.

The device loaders are imported eagerly and need no torch, so `tfcompile targets`
and an unknown --target answer at once; the roofline (``estimate``,
``CostEstimate``) reads torch graphs and is imported on first use.
"""

from tfcompile.cost_models.device import DeviceSpec, available_targets, device_from_toml, load_device  # noqa: F401

__all__ = ["CostEstimate", "DeviceSpec", "available_targets", "device_from_toml", "estimate", "load_device"]


def __getattr__(name: str):
    if name in ("CostEstimate", "estimate"):
        from tfcompile.cost_models import roofline

        return getattr(roofline, name)
    raise AttributeError(f"module 'tfcompile.cost_models' has no attribute {name!r}")
