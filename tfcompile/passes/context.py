"""The pass context: what a run is optimising for, built once and read by every pass.

Like TVM Relax's ``PassContext``, one object carries the facts that are not
part of the graph: the target device, the backend that will run the variant,
the cost model bound to both, and the workload. Passes and the search read it;
target, backend and lengths are never pass knobs.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from tfcompile.cost_models.device import DeviceSpec
from tfcompile.cost_models.model import CostModel, cost_model_for
from tfcompile.workload import Workload

__all__ = ["PassContext", "Workload", "default_context"]


@dataclasses.dataclass(frozen=True)
class PassContext:
    cost_model: CostModel
    workload: Workload = Workload()

    @property
    def device(self) -> DeviceSpec:
        return self.cost_model.device

    @property
    def target(self) -> str:
        return self.cost_model.device.name

    @property
    def backend(self) -> str:
        return self.cost_model.backend

    @classmethod
    def build(cls, target: str | DeviceSpec = "cpu", backend: str = "ort", *, workload: Workload | None = None,
              profile_path: Path | None = None, calibrated: bool = True) -> PassContext:
        model = cost_model_for(target, backend, profile_path=profile_path, calibrated=calibrated)
        return cls(model, workload or Workload())


@functools.lru_cache(maxsize=1)
def default_context() -> PassContext:
    """The host CPU's roofline with ONNX Runtime and a dense batch: what a pass sees when nobody says otherwise."""
    return PassContext.build("cpu", "ort", calibrated=False)
