"""Cost models: device specs as data, per-op formulas, roofline estimate."""

from tfcompile.cost_models.device import DeviceSpec, available_targets, device_from_toml, load_device  # noqa: F401
from tfcompile.cost_models.roofline import CostEstimate, estimate  # noqa: F401
