"""Calibration profiles: fitted cost coefficients per (target, backend).

Model: each kernel (after the backend's fusion rules) costs
``a[class] * FLOPs + b[class] * bytes + t_kernel`` seconds and a whole run adds
``t_graph``. On CPUs compute and memory time add up more than they overlap, so
the sum fits better than a max and keeps the fit linear. GEMMs with few rows
(M < 64, decode-like) get their own class because their efficiency is far lower,
and two of them: in a graph whose weights fit in the last-level cache a run
finds them there (a micro-benchmark timed in a loop), while in one whose
weights outgrow it (a decoder's decode step) every run streams them from DRAM,
so bytes cost several times more ("gemm_stream"). A GEMM of many rows in such a
graph (a prefill over the prompt) still reads its weights from DRAM once per
run, but it reuses each weight for every row, so the hardware prefetcher hides
that read behind its compute: it costs the larger of its own class's cost and
its weights at the "gemm_stream" rate (``streamed_weight_bytes``), a roofline
max, and the fit leaves that read out of its features. On the Xeon of session
13 the sum over-predicted the suite's own prefill-sized streaming stacks by
12-20 % (2-6 % with the max) and gpt2-small's prefill by 21 % (12 %); there the
compute side is the larger from about 17 rows, and the class starts at 64.
On ORT and TVM, whose attention is unfused, every attention's passes over its
score tensor are bytes of their own classes (``score_pass_bytes``): the four
passes of any attention ("scores"), the mask's Add ("score_mask") and a boolean
mask's IsNaN and Where ("score_guard"), each fitted its own cost per byte
(``op_costs.unfused_score_bytes``). On the Xeon of session 12 an additive mask
cost 3 ns per score and the boolean mask's guard 2.7 ns more, against 1.75 ns
for all of an unmasked SDPA (Add, Softmax, IsNaN and Where were 22 % of
llama-tiny's run at 512 tokens); priced as a plain SDPA, masked attentions
were predicted 25-50 % under measured. And a score tensor larger than the
target's last-level cache adds its DRAM passes (``roofline.score_traffic_bytes``)
to the elementwise ("memory") bytes.

Coefficients are fitted by non-negative least squares on relative error (each
row divided by its measured time, so a 10 us kernel counts as much as a 10 ms
one; ``cost_models.nnls``). The stacks of whole layers weigh as much in the fit
as the isolated kernels together (``composite_weights``): what is predicted is
whole models, and the kernels' rates alone left the stacks 10-28 % under on
TVM (session 16's Xeon). Profiles are versioned JSON data, never pickles.

A profile of the torch device backend (``calibrate_device``) also records how
torch ran (device, mode, precision) and, on cuda, the GPU's name: it is saved
per options (``profile_path``) and refused on another GPU or for other options,
since launch costs and kernels differ between them (CUDA-graph replay pays
~1 us per kernel, eager ~8 us; bf16 GEMMs run on tensor cores).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np

from tfcompile.cost_models.cache_spill import core_cache_bytes, kernel_spill_bytes, score_spill_bytes
from tfcompile.cost_models.device import host_identity, known_device
from tfcompile.cost_models.fusion import Kernel, group_kernels
from tfcompile.cost_models.host_speed import HostSpeed
from tfcompile.cost_models.nnls import nnls
from tfcompile.cost_models.op_costs import SCORE_PASS_KINDS
from tfcompile.cost_models.roofline import estimate
from tfcompile.cost_models.score_passes import attention_traffic_bytes, score_pass_bytes
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
CLASSES = ("gemm", "gemm_skinny", "gemm_stream", "attention", "norm", "softmax", "memory",
           "activation", "norm_residual", "scatter", "spill") + SCORE_PASS_KINDS  # spill: bytes only (cache_spill)
SKINNY_ROWS = 64
# What a profile fitted before a class existed prices that class's kernels as.
_OLDER_CLASS = {"gemm_stream": "gemm_skinny", "activation": "memory", "norm_residual": "norm", "scatter": "memory",
                "score_reduce": "score_mask"}



def streams_weights(graph, target: str) -> bool:
    """Whether ``graph``'s weights outgrow ``target``'s last-level cache, so each run reads them from DRAM."""
    device = known_device(target)
    parameter_bytes = getattr(graph, "parameter_bytes", None)
    return bool(device is not None and device.cache_bytes and parameter_bytes is not None
                and parameter_bytes() > device.cache_bytes)


def kernel_class(kernel: Kernel, streaming: bool = False) -> str:
    if kernel.op_class == "gemm" and 0 < kernel.tokens < SKINNY_ROWS:
        return "gemm_stream" if streaming else "gemm_skinny"
    return kernel.op_class


def streamed_weight_bytes(kernel: Kernel, streaming: bool) -> float:
    """DRAM bytes a non-skinny GEMM reads whatever its own class's cost: its weights, when the graph streams
    them (``Profile.kernel_s`` takes the larger of the two times)."""
    return kernel.weight_bytes if streaming and kernel_class(kernel, streaming) == "gemm" else 0.0


@dataclasses.dataclass
class Profile:
    target: str
    backend: str
    s_per_flop: dict[str, float]
    s_per_byte: dict[str, float]
    kernel_overhead_s: float
    graph_overhead_s: float
    # Seconds per view node the runtime dispatches (ORT's Reshape/Unsqueeze; fusion.group_kernels).
    view_overhead_s: float = 0.0
    created: str = ""
    host: str = ""
    fit_mape: float = 0.0
    # device.host_identity() of the host measured on ("" when made remotely or before it was recorded).
    host_id: str = ""
    # Checked before saving: MAPE on held-out micro-benchmarks of a fit without them, and the roofline's there.
    heldout_mape: float = 0.0
    heldout_roofline_mape: float = 0.0
    # The FLOPs-only baseline (t = c * FLOPs), fitted on the same samples.
    flops_only_s_per_flop: float = 0.0
    samples: list[dict] = dataclasses.field(default_factory=list)
    # How the torch device backend ran the micro-benchmarks ("" for every other profile: torch cpu eager fp32).
    torch_device: str = ""
    torch_mode: str = ""
    torch_precision: str = ""
    gpu_name: str = ""  # torch.cuda.get_device_name() of the GPU measured on
    # host_speed.probe_host_speed() around the suite (the faster of before and after); 0: not probed here.
    probe_gemm_flops_per_s: float = 0.0
    probe_read_bytes_per_s: float = 0.0

    @property
    def host_speed(self) -> HostSpeed | None:
        """How fast this host ran when calibrated, or None when the profile did not record it."""
        probed = self.probe_gemm_flops_per_s and self.probe_read_bytes_per_s
        return HostSpeed(self.probe_gemm_flops_per_s, self.probe_read_bytes_per_s) if probed else None

    @property
    def torch_options(self) -> dict[str, str]:
        """``{}`` or {"device", "mode", "precision"}, as ``cli_options.device_options`` passes them."""
        if not self.torch_device:
            return {}
        return {"device": self.torch_device, "mode": self.torch_mode, "precision": self.torch_precision}

    def predict_s(self, graph: ModelGraph, flop_speedup: dict[str, float] | None = None) -> float:
        """``flop_speedup``: the device's peak per dtype over its fp32 peak. The profile's FLOP rates are
        fitted on kernels in its own dtype (``fitted_dtype``: fp32 unless calibrated at bf16 or fp16); a
        kernel in another dtype runs at that rate times the ratio of the two peaks (the roofline's
        assumption, not a fit)."""
        return sum(seconds for _, seconds in self.parts_s(graph, flop_speedup))

    def parts_s(self, graph: ModelGraph, flop_speedup: dict[str, float] | None = None) -> list[tuple[object, float]]:
        """The terms ``predict_s`` adds, each with what it prices: a ``Kernel`` (with its class from
        ``kernel_class``), "graph overhead", "attention traffic" or a score-pass kind."""
        streaming = streams_weights(graph, self.target)
        traffic_s = self.s_per_byte.get("memory", 0.0) * attention_traffic_bytes(graph, self.target, self.backend)
        cache, spill_s = core_cache_bytes(self.target), self.s_per_byte.get("spill", 0.0)
        kernels = [(k, self.kernel_s(k, streaming, flop_speedup)
                    + spill_s * kernel_spill_bytes(k, kernel_class(k, streaming), cache))
                   for k in group_kernels(graph, self.backend)]
        passes = [(kind, self.byte_s(kind) * size) for kind, size in score_pass_bytes(graph, self.backend).items()]
        spilled = ("score spill", spill_s * score_spill_bytes(graph, self.target, self.backend))
        return [("graph overhead", self.graph_overhead_s), ("attention traffic", traffic_s), spilled, *kernels, *passes]

    def byte_s(self, kind: str) -> float:
        """Seconds per byte of a score pass ``kind``, as an older profile without that kind prices it."""
        return self.s_per_byte.get(kind, self.s_per_byte.get(_OLDER_CLASS.get(kind, ""), 0.0))

    def predict_flops_only_s(self, graph: ModelGraph) -> float:
        return self.flops_only_s_per_flop * sum(k.flops for k in group_kernels(graph, self.backend))

    def kernel_s(self, kernel: Kernel, streaming: bool = False,
                 flop_speedup: dict[str, float] | None = None) -> float:
        if kernel.op_class == "view":
            return self.view_overhead_s
        cls = kernel_class(kernel, streaming)
        if cls not in self.s_per_flop and cls in _OLDER_CLASS:
            cls = _OLDER_CLASS[cls]  # a profile from before the class
        speedup = 1.0
        if kernel.dtype != self.fitted_dtype and flop_speedup:
            speedup = flop_speedup.get(kernel.dtype, 1.0) / flop_speedup.get(self.fitted_dtype, 1.0)
        own_s = (self.s_per_flop.get(cls, 0.0) * kernel.flops / speedup
                 + self.s_per_byte.get(cls, 0.0) * kernel.bytes_moved)
        stream_s = self.s_per_byte.get("gemm_stream", 0.0) * streamed_weight_bytes(kernel, streaming)
        return max(own_s, stream_s) + self.kernel_overhead_s

    @property
    def fitted_dtype(self) -> str:
        """The kernels' dtype in the micro-benchmarks: tf32 keeps fp32 tensors (only the tensor cores differ)."""
        return self.torch_precision if self.torch_precision in ("bf16", "fp16") else "fp32"

    def to_json(self) -> str:
        return json.dumps({"version": PROFILE_VERSION, **dataclasses.asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "profile") -> "Profile":
        """Parse and validate a saved profile: each missing, unknown or mistyped field is one clear error."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TfcompileError(f"{source}: not a calibration profile (invalid JSON: {exc.msg})") from exc
        except UnicodeDecodeError as exc:
            raise TfcompileError(f"{source}: not a calibration profile (not UTF-8 text)") from exc
        except RecursionError as exc:
            raise TfcompileError(f"{source}: not a calibration profile (JSON nested too deeply)") from exc
        if not isinstance(data, dict):
            kind = {list: "an array", str: "a string", type(None): "null"}.get(type(data), "a number")
            raise TfcompileError(f"{source}: not a calibration profile (JSON {kind}, not an object)")
        version = data.get("version", "missing")
        if type(version) is not int or version != PROFILE_VERSION:  # a JSON true equals 1 in Python
            raise TfcompileError(f"{source}: calibration profile version is {_short(version)}, not "
                                 f"{PROFILE_VERSION}; recalibrate")
        return cls(**_ProfileFields(source, data).read())


_MISSING = object()
_OPTIONAL_NUMBERS = ("view_overhead_s", "fit_mape", "heldout_mape", "heldout_roofline_mape", "flops_only_s_per_flop",
                     "probe_gemm_flops_per_s", "probe_read_bytes_per_s")


class _ProfileFields:
    """Typed access to a profile's fields, naming the field and what it holds when it is wrong."""

    def __init__(self, source: str, data: dict):
        self.source, self.data = source, data

    def _fail(self, key: str, expected: str, value: object = _MISSING) -> TfcompileError:
        found = "missing" if value is _MISSING else f"{type(value).__name__} {_short(value)}"
        return TfcompileError(f"{self.source}: calibration profile field {key} must be {expected}; found {found} "
                              "(recalibrate with `tfcompile calibrate`)")

    def number(self, key: str, value: object = _MISSING, *, required: bool = True) -> float:
        value = self.data.get(key, _MISSING if required else 0.0) if value is _MISSING else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= sys.float_info.max:
            raise self._fail(key, "a finite number >= 0", value)
        return float(value)

    def text(self, key: str, *, required: bool = True) -> str:
        value = self.data.get(key, _MISSING if required else "")
        if not isinstance(value, str) or (required and not value):
            raise self._fail(key, "a non-empty string" if required else "a string", value)
        return value

    def per_class(self, key: str) -> dict[str, float]:
        value = self.data.get(key, _MISSING)
        if not isinstance(value, dict):
            raise self._fail(key, f"an object of numbers per kernel class ({', '.join(CLASSES)})", value)
        unknown = sorted(set(value) - set(CLASSES))
        if unknown:
            raise TfcompileError(f"{self.source}: calibration profile field {key} has unknown kernel class "
                                 f"{_short(unknown[0])} (classes: {', '.join(CLASSES)})")
        return {c: self.number(f"{key}.{c}", v) for c, v in value.items()}

    def samples(self) -> list[dict]:
        value = self.data.get("samples", [])
        if not isinstance(value, list):
            raise self._fail("samples", "a list", value)
        for i, record in enumerate(value):
            if not isinstance(record, dict) or not isinstance(record.get("name"), str):
                raise self._fail(f"samples[{i}]", "an object with name, measured_s and predicted_s", record)
            for key in ("measured_s", "predicted_s"):
                self.number(f"samples[{i}].{key}", record.get(key, _MISSING))
        return value

    def read(self) -> dict:
        unknown = sorted(set(self.data) - {"version"} - {f.name for f in dataclasses.fields(Profile)})
        if unknown:
            raise TfcompileError(f"{self.source}: calibration profile has unknown field {unknown[0]!r} "
                                 "(recalibrate with `tfcompile calibrate`)")
        return {"target": self.text("target"), "backend": self.text("backend"),
                "s_per_flop": self.per_class("s_per_flop"), "s_per_byte": self.per_class("s_per_byte"),
                "kernel_overhead_s": self.number("kernel_overhead_s"),
                "graph_overhead_s": self.number("graph_overhead_s"),
                **{key: self.number(key, required=False) for key in _OPTIONAL_NUMBERS},
                **{key: self.text(key, required=False) for key in ("created", "host", "host_id")},
                "samples": self.samples(), **self.torch_run()}

    def torch_run(self) -> dict[str, str]:
        run = {key: self.text(key, required=False) for key in ("torch_device", "torch_mode", "torch_precision")}
        if any(run.values()) and not all(run.values()):
            raise self._fail("torch_device, torch_mode and torch_precision", "all three given or none",
                             [run[k] for k in sorted(run)])
        allowed = {"torch_device": ("", "cpu", "cuda"), "torch_mode": ("", "eager", "graphs", "compile"),
                   "torch_precision": ("", "fp32", "tf32", "bf16", "fp16")}
        for key, value in run.items():
            if value not in allowed[key]:
                raise self._fail(key, f"one of {', '.join(allowed[key][1:])}", value)
        return {**run, "gpu_name": self.text("gpu_name", required=False)}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def features(graph: ModelGraph, backend: str, target: str = "") -> np.ndarray:
    """One row: FLOPs and bytes per class, view nodes, kernel count, 1 (graph overhead)."""
    row = np.zeros(2 * len(CLASSES) + 3)
    streaming, cache = streams_weights(graph, target), core_cache_bytes(target)
    row[2 * CLASSES.index("spill") + 1] = score_spill_bytes(graph, target, backend)
    for kernel in group_kernels(graph, backend):
        if kernel.op_class == "view":
            row[-3] += 1
            continue
        row[2 * CLASSES.index("spill") + 1] += kernel_spill_bytes(kernel, kernel_class(kernel, streaming), cache)
        i = CLASSES.index(kernel_class(kernel, streaming))
        row[2 * i] += kernel.flops
        row[2 * i + 1] += kernel.bytes_moved
        row[-2] += 1
    row[2 * CLASSES.index("memory") + 1] += attention_traffic_bytes(graph, target, backend)
    for kind, size in score_pass_bytes(graph, backend).items():
        row[2 * CLASSES.index(kind) + 1] += size
    row[-1] = 1.0
    return row


def fit(samples, target: str, backend: str, host: str = "", host_id: str = "",
        torch_options: dict[str, str] | None = None, gpu_name: str = "") -> Profile:
    """Fit a profile to ``(name, graph, measured_s)`` samples; ``torch_options`` and ``gpu_name`` say how
    and where the torch device backend measured them (``Profile.torch_options``)."""
    rows = np.stack([features(s.graph, backend, target) for s in samples])
    measured = np.array([s.measured_s for s in samples])
    # Scale columns to O(1) so NNLS is well conditioned, then undo the scaling.
    scale = rows.max(axis=0)
    scale[scale == 0] = 1.0
    weight = composite_weights([s.name for s in samples])
    weighted = (rows / scale) / measured[:, None] * weight[:, None]
    coef, _ = nnls(weighted, weight)
    coef = coef / scale
    predicted = rows @ coef
    records = [{"name": s.name, "measured_s": float(m), "predicted_s": float(p)}
               for s, m, p in zip(samples, measured, predicted)]
    mape = float(np.mean(np.abs(predicted - measured) / measured))
    total_flops = rows[:, 0:-3:2].sum(axis=1)
    flops_coef, _ = nnls((total_flops / measured)[:, None] / max(total_flops.max(), 1.0), np.ones(len(samples)))
    return Profile(
        flops_only_s_per_flop=float(flops_coef[0] / max(total_flops.max(), 1.0)),
        target=target, backend=backend,
        s_per_flop={c: float(coef[2 * i]) for i, c in enumerate(CLASSES)},
        s_per_byte={c: float(coef[2 * i + 1]) for i, c in enumerate(CLASSES)},
        view_overhead_s=float(coef[-3]), kernel_overhead_s=float(coef[-2]), graph_overhead_s=float(coef[-1]),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=host, host_id=host_id, fit_mape=mape, samples=records, gpu_name=gpu_name,
        **{f"torch_{key}": value for key, value in (torch_options or {}).items()})


COMPOSITE_PREFIXES = ("blocks_", "stream_blocks_")


def composite_weights(names: list[str]) -> np.ndarray:
    """Each sample's weight in the fit: the stacks of whole layers (COMPOSITE_PREFIXES) together weigh as
    much as the isolated kernels together (``calibrate``'s "blocks")."""
    composite = np.array([name.startswith(COMPOSITE_PREFIXES) for name in names])
    if composite.all() or not composite.any():
        return np.ones(len(names))
    return np.where(composite, (~composite).sum() / composite.sum(), 1.0)


HELD_OUT_EVERY = 4  # every 4th micro-benchmark is held out of the checking fit


def fit_checked(samples, target: str, backend: str, host: str = "", host_id: str = "",
                torch_options: dict[str, str] | None = None, gpu_name: str = "") -> Profile:
    """``fit`` on every sample, with ``heldout_mape`` from a fit that did not see every HELD_OUT_EVERY-th
    sample, measured on those, and the roofline's MAPE on the same ones: the saved profile says whether
    calibration improves on the roofline on kernels it was not fitted to (``improves_on_roofline``)."""
    held = samples[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    kept = [s for i, s in enumerate(samples) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    profile = fit(samples, target, backend, host=host, host_id=host_id, torch_options=torch_options,
                  gpu_name=gpu_name)
    if held and kept:
        trial = fit(kept, target, backend, torch_options=torch_options)
        device = known_device(target)
        profile.heldout_mape = _mape([trial.predict_s(s.graph) for s in held], held)
        if device is not None:
            profile.heldout_roofline_mape = _mape([estimate(s.graph, device).latency_s for s in held], held)
    return profile


def improves_on_roofline(profile: Profile) -> bool:
    """True when the held-out check shows the fit no worse than the roofline (or no roofline to compare)."""
    return not profile.heldout_roofline_mape or profile.heldout_mape <= profile.heldout_roofline_mape


def _mape(predicted: list[float], samples) -> float:
    return float(np.mean([abs(p - s.measured_s) / s.measured_s for p, s in zip(predicted, samples)]))


def profile_dir() -> Path:
    return Path(os.environ.get("TFCOMPILE_PROFILE_DIR", Path.home() / ".cache" / "tfcompile" / "profiles"))


def profile_path(target: str, backend: str, torch_options: dict[str, str] | None = None) -> Path:
    """``h100-torch-cuda-graphs-bf16.json`` for the torch device backend's options, else ``cpu-ort.json``."""
    suffix = "".join(f"-{torch_options[key]}" for key in ("device", "mode", "precision")) if torch_options else ""
    return profile_dir() / f"{target}-{backend}{suffix}.json"


def gpu_name_here() -> str:
    """torch.cuda.get_device_name() of this machine's current GPU, "" without CUDA."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else ""


def save_profile(profile: Profile, path: Path | None = None) -> Path:
    path = path or profile_path(profile.target, profile.backend, profile.torch_options)
    atomic_write_text(path, profile.to_json())
    return path


def load_profile(target: str, backend: str, path: Path | None = None, torch_options: dict[str, str] | None = None,
                 gpu_name: str | None = None) -> Profile | None:
    """The profile for (target, backend, torch_options): at ``path`` if given, else the saved one (None if
    none was saved).

    A profile fitted for another target or backend, for other torch options, or on a GPU other than
    ``gpu_name`` (default: this machine's, ``gpu_name_here``) is refused: its coefficients describe another
    machine or another way of running it.
    """
    explicit, path = path is not None, Path(path or profile_path(target, backend, torch_options))
    if not path.is_file():
        if explicit or path.exists():
            why = "not a file" if path.exists() else "no such file"
            raise TfcompileError(f"{path}: no calibration profile there ({why})")
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TfcompileError(f"{path}: cannot read the calibration profile: {exc.strerror or exc}") from exc
    profile = Profile.from_json(data, str(path))
    if profile.host_id and target == "cpu" and profile.host_id != host_identity():
        raise TfcompileError(f"{path}: calibration profile measured on another host ({profile.host_id}); this host "
                             f"is {host_identity()}: calibrate it with `tfcompile calibrate`")
    if (profile.target, profile.backend) != (target, backend):
        raise TfcompileError(f"{path}: calibration profile for {profile.target}/{profile.backend}, not "
                             f"{target}/{backend}; calibrate this pair with `tfcompile calibrate --target {target} "
                             f"--backend {backend}`")
    check_torch_run(profile, torch_options or {}, gpu_name, str(path))
    return profile


def check_torch_run(profile: Profile, torch_options: dict[str, str], gpu_name: str | None, source: str) -> None:
    """Refuse, in one line, a profile measured with other torch options or on another GPU."""
    def spelled(options: dict[str, str]) -> str:
        return " ".join(options.values()) if options else "cpu eager fp32"

    command = f"tfcompile calibrate --target {profile.target} --backend {profile.backend}" + "".join(
        f" --{key} {value}" for key, value in torch_options.items())
    if profile.torch_options != torch_options:
        raise TfcompileError(f"{source}: calibration profile measured with torch {spelled(profile.torch_options)}, "
                             f"not {spelled(torch_options)}; calibrate these options with `{command}`")
    if not profile.gpu_name:
        return
    here = gpu_name_here() if gpu_name is None else gpu_name
    if here != profile.gpu_name:
        raise TfcompileError(f"{source}: calibration profile measured on {profile.gpu_name}, this machine has "
                             f"{here or 'no CUDA device'}; calibrate this GPU with `{command}`")
