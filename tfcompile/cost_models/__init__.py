"""Cost models: device specs as data, per-op formulas, roofline estimate."""

from tfcompile.cost_models.device import DeviceSpec, available_targets, load_device  # noqa: F401
from tfcompile.cost_models.roofline import CostEstimate, estimate  # noqa: F401
