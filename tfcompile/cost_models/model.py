"""One cost model interface: a device, a backend and coefficients bound together.

Every caller (search, passes, optimize, compare, remote measurement,
benchmarks) asks a ``CostModel`` for ``predict(graph)``; none resolves a
target string, a profile file and a formula on its own.

- ``RooflineCostModel``: the device file's peaks and efficiencies, per kernel
  max(compute, memory) + overhead (``roofline.estimate``).
- ``CalibratedCostModel``: a fitted profile for (target, backend)
  (``calibration.Profile``); FLOPs and bytes still come from the roofline walk.

``predict`` accepts anything with ``call_nodes()``: a ModelGraph, or a
``structure.GraphBuilder`` sketch of a candidate sub-graph (the FFN forms a pass weighs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

from tfcompile.cost_models.calibration import Profile, load_profile
from tfcompile.cost_models.device import DeviceSpec, load_device
from tfcompile.cost_models.host_speed import HostSpeed
from tfcompile.cost_models.roofline import estimate


@dataclasses.dataclass(frozen=True)
class Prediction:
    latency_s: float
    flops: float
    bytes_moved: float
    kind: str  # "roofline" or "calibrated"


class CostModel(Protocol):
    device: DeviceSpec
    backend: str

    @property
    def kind(self) -> str: ...

    @property
    def label(self) -> str: ...

    @property
    def provenance(self) -> dict: ...

    @property
    def host_speed(self) -> HostSpeed | None:
        """How fast this host ran when the coefficients were measured (None: not recorded)."""
        ...

    def predict(self, graph) -> Prediction: ...


@dataclasses.dataclass(frozen=True)
class RooflineCostModel:
    device: DeviceSpec
    backend: str = "ort"

    @property
    def kind(self) -> str:
        return "roofline"

    @property
    def label(self) -> str:
        return "roofline"

    @property
    def provenance(self) -> dict:
        """Where the prediction comes from, for the report and the table's caption."""
        source = ("this host's detected peaks" if self.device.name == "cpu"
                  else f"the {self.device.name} datasheet")
        return {"kind": "roofline", "device": self.device.name, "backend": self.backend,
                "text": f"roofline from {source}, uncalibrated"}

    @property
    def host_speed(self) -> HostSpeed | None:
        return None  # peaks from the datasheet or /proc/cpuinfo, not a measurement

    def predict(self, graph) -> Prediction:
        result = estimate(graph, self.device)
        return Prediction(result.latency_s, result.flops, result.bytes_moved, self.kind)


@dataclasses.dataclass(frozen=True)
class CalibratedCostModel:
    device: DeviceSpec
    backend: str
    profile: Profile

    @property
    def kind(self) -> str:
        return "calibrated"

    @property
    def label(self) -> str:
        return f"calibrated {self.device.name}/{self.backend}"

    @property
    def provenance(self) -> dict:
        p = self.profile
        day = p.created[:10] or "undated"
        host = f", {p.host}" if p.host else ""
        return {"kind": "calibrated", "device": self.device.name, "backend": self.backend, "created": p.created,
                "host": p.host, "fit_mape": p.fit_mape,
                "text": f"calibrated profile {self.device.name}/{self.backend} ({day}{host}; fit MAPE "
                        f"{p.fit_mape:.0%})"}

    @property
    def host_speed(self) -> HostSpeed | None:
        return self.profile.host_speed

    @property
    def flop_speedup(self) -> dict[str, float]:
        """The device's peak per dtype over its fp32 peak (``Profile.predict_s``)."""
        fp32 = self.device.peak_for("fp32")
        return {dtype: self.device.peak_for(dtype) / fp32 for dtype in self.device.peak_flops}

    def predict(self, graph) -> Prediction:
        roofline = estimate(graph, self.device)
        return Prediction(self.profile.predict_s(graph, self.flop_speedup), roofline.flops, roofline.bytes_moved,
                          self.kind)


def cost_model_for(target: str | DeviceSpec, backend: str = "ort", *, profile_path: Path | None = None,
                   calibrated: bool = True, torch_options: dict[str, str] | None = None) -> CostModel:
    """The target's calibrated model when a profile for (target, backend) exists, else its roofline.

    ``torch_options`` (device, mode, precision) select the torch device backend's profile for them; one
    made with other options, or on another GPU, is refused (``calibration.load_profile``)."""
    device = load_device(target) if isinstance(target, str) else target
    profile = load_profile(device.name, backend, profile_path, torch_options=torch_options) if calibrated else None
    if profile is not None:
        return CalibratedCostModel(device, backend, profile)
    return RooflineCostModel(device, backend)
