"""Calibration profiles: fitted cost coefficients per (target, backend).

Model: each kernel (after the backend's fusion rules) costs
``a[class] * FLOPs + b[class] * bytes + t_kernel`` seconds and a whole run adds
``t_graph``. On CPUs compute and memory time add up more than they overlap, so
the sum fits better than a max and keeps the fit linear. GEMMs with few rows
(M < 64, decode-like) get their own class because their efficiency is far lower.
On ORT and TVM, whose attention is unfused, a score tensor larger than the
target's last-level cache adds its DRAM passes (``roofline.score_traffic_bytes``)
to the elementwise ("memory") bytes.

Coefficients are fitted by non-negative least squares on relative error (each
row divided by its measured time, so a 10 us kernel counts as much as a 10 ms
one). Profiles are versioned JSON data, never pickles.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from tfcompile.cost_models.device import available_targets, load_device
from tfcompile.cost_models.fusion import Kernel, group_kernels
from tfcompile.cost_models.roofline import score_traffic_bytes
from tfcompile.errors import TfcompileError
from tfcompile.graph import ModelGraph
from tfcompile.outputs import atomic_write_text


@dataclasses.dataclass(frozen=True)
class Sample:
    """One measured graph: what ``fit`` learns from."""

    name: str
    graph: ModelGraph
    measured_s: float


PROFILE_VERSION = 1
CLASSES = ("gemm", "gemm_skinny", "attention", "norm", "softmax", "memory")
SKINNY_ROWS = 64


UNFUSED_ATTENTION_BACKENDS = {"ort", "tvm"}


@functools.lru_cache(maxsize=None)
def _device(target: str):
    return load_device(target) if target in available_targets() else None


def attention_traffic_bytes(graph: ModelGraph, target: str, backend: str) -> float:
    """Score-tensor DRAM bytes of every attention in ``graph`` on ``backend`` (0 when fused)."""
    device = _device(target) if backend in UNFUSED_ATTENTION_BACKENDS else None
    if device is None or not device.attention_score_passes:
        return 0.0
    return float(sum(score_traffic_bytes(node, device) for node in graph.call_nodes()))


def kernel_class(kernel: Kernel) -> str:
    if kernel.op_class == "gemm" and 0 < kernel.tokens < SKINNY_ROWS:
        return "gemm_skinny"
    return kernel.op_class


@dataclasses.dataclass
class Profile:
    target: str
    backend: str
    s_per_flop: dict[str, float]
    s_per_byte: dict[str, float]
    kernel_overhead_s: float
    graph_overhead_s: float
    created: str = ""
    host: str = ""
    fit_mape: float = 0.0
    # The FLOPs-only baseline (t = c * FLOPs), fitted on the same samples.
    flops_only_s_per_flop: float = 0.0
    samples: list[dict] = dataclasses.field(default_factory=list)

    def predict_s(self, graph: ModelGraph) -> float:
        kernels = group_kernels(graph, self.backend)
        traffic = attention_traffic_bytes(graph, self.target, self.backend)
        return (self.graph_overhead_s + sum(self.kernel_s(k) for k in kernels)
                + self.s_per_byte.get("memory", 0.0) * traffic)

    def predict_flops_only_s(self, graph: ModelGraph) -> float:
        return self.flops_only_s_per_flop * sum(k.flops for k in group_kernels(graph, self.backend))

    def kernel_s(self, kernel: Kernel) -> float:
        cls = kernel_class(kernel)
        return (self.s_per_flop.get(cls, 0.0) * kernel.flops + self.s_per_byte.get(cls, 0.0) * kernel.bytes_moved
                + self.kernel_overhead_s)

    def to_json(self) -> str:
        return json.dumps({"version": PROFILE_VERSION, **dataclasses.asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "profile") -> "Profile":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TfcompileError(f"{source}: not a calibration profile (invalid JSON: {exc.msg})") from exc
        if data.pop("version", None) != PROFILE_VERSION:
            raise TfcompileError(f"{source}: calibration profile version is not {PROFILE_VERSION}; recalibrate")
        return cls(**data)


def features(graph: ModelGraph, backend: str, target: str = "") -> np.ndarray:
    """One row: FLOPs and bytes per class, kernel count, 1 (graph overhead)."""
    row = np.zeros(2 * len(CLASSES) + 2)
    for kernel in group_kernels(graph, backend):
        i = CLASSES.index(kernel_class(kernel))
        row[2 * i] += kernel.flops
        row[2 * i + 1] += kernel.bytes_moved
        row[-2] += 1
    row[2 * CLASSES.index("memory") + 1] += attention_traffic_bytes(graph, target, backend)
    row[-1] = 1.0
    return row


def fit(samples, target: str, backend: str, host: str = "") -> Profile:
    """Fit a profile to ``(name, graph, measured_s)`` samples."""
    rows = np.stack([features(s.graph, backend, target) for s in samples])
    measured = np.array([s.measured_s for s in samples])
    # Scale columns to O(1) so NNLS is well conditioned, then undo the scaling.
    scale = rows.max(axis=0)
    scale[scale == 0] = 1.0
    weighted = (rows / scale) / measured[:, None]
    coef, _ = nnls(weighted, np.ones(len(samples)))
    coef = coef / scale
    predicted = rows @ coef
    records = [{"name": s.name, "measured_s": float(m), "predicted_s": float(p)}
               for s, m, p in zip(samples, measured, predicted)]
    mape = float(np.mean(np.abs(predicted - measured) / measured))
    total_flops = rows[:, 0:-2:2].sum(axis=1)
    flops_coef, _ = nnls((total_flops / measured)[:, None] / max(total_flops.max(), 1.0), np.ones(len(samples)))
    return Profile(
        flops_only_s_per_flop=float(flops_coef[0] / max(total_flops.max(), 1.0)),
        target=target, backend=backend,
        s_per_flop={c: float(coef[2 * i]) for i, c in enumerate(CLASSES)},
        s_per_byte={c: float(coef[2 * i + 1]) for i, c in enumerate(CLASSES)},
        kernel_overhead_s=float(coef[-2]), graph_overhead_s=float(coef[-1]),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=host, fit_mape=mape, samples=records)


def profile_dir() -> Path:
    return Path(os.environ.get("TFCOMPILE_PROFILE_DIR", Path.home() / ".cache" / "tfcompile" / "profiles"))


def profile_path(target: str, backend: str) -> Path:
    return profile_dir() / f"{target}-{backend}.json"


def save_profile(profile: Profile, path: Path | None = None) -> Path:
    path = path or profile_path(profile.target, profile.backend)
    atomic_write_text(path, profile.to_json())
    return path


def load_profile(target: str, backend: str, path: Path | None = None) -> Profile | None:
    path = path or profile_path(target, backend)
    if not path.is_file():
        return None
    return Profile.from_json(path.read_text(), str(path))
