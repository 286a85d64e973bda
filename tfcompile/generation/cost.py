"""Predicted TTFT and TPOT from the prefill and decode-step graphs with the run's cost model.

Each phase is one graph (``generation.trace``), priced by the same
``CostModel.predict`` every other graph gets: TTFT = the prefill graph's
prediction, TPOT = the decode step's. The two phases sit on opposite sides of
the roofline. The prefill multiplies each weight by ``B x P`` tokens (GEMMs,
compute-bound like any forward pass), yet weights larger than a CPU's last-level
cache still come from DRAM once per prefill; reused by every token, that read
hides behind the compute, and the calibrated model prices each GEMM at the
larger of the two (``calibration.streamed_weight_bytes``). At small batch the decode step
multiplies each weight by ``B`` tokens only, so it streams every weight (and
the static cache, which the step reads and, being functional, copies) from
memory once per token: its time is about bytes / bandwidth, and
``weight_streaming_bound_s`` says what that floor is for a given bandwidth.
A device with more FLOP/s but the same bandwidth shortens TTFT and leaves
TPOT alone.
"""

from __future__ import annotations

import dataclasses

from tfcompile.cost_models.model import CostModel, Prediction
from tfcompile.generation.trace import GenerationGraphs


@dataclasses.dataclass(frozen=True)
class GenerationPrediction:
    prefill: Prediction
    decode: Prediction
    new_tokens: int
    weight_bytes: int  # parameters read once per decode step
    cache_bytes: int  # the whole static cache (keys and values of every layer)
    ridge_flops_per_byte: float  # the device's peak FLOP/s over its bandwidth

    @property
    def ttft_s(self) -> float:
        return self.prefill.latency_s

    @property
    def tpot_s(self) -> float:
        return self.decode.latency_s

    @property
    def generation_s(self) -> float:
        return self.ttft_s + (self.new_tokens - 1) * self.tpot_s

    def intensity(self, phase: str) -> float:
        """FLOPs per byte moved of ``phase`` ("prefill" or "decode")."""
        prediction = self.prefill if phase == "prefill" else self.decode
        return prediction.flops / prediction.bytes_moved if prediction.bytes_moved else float("inf")

    def bound(self, phase: str) -> str:
        """"compute" when the phase's FLOPs per byte exceed the device's ridge point, else "memory"."""
        return "compute" if self.intensity(phase) >= self.ridge_flops_per_byte else "memory"

    def as_dict(self) -> dict:
        return {"ttft_ms": self.ttft_s * 1e3, "tpot_ms": self.tpot_s * 1e3, "generation_ms": self.generation_s * 1e3,
                "new_tokens": self.new_tokens, "weight_bytes": self.weight_bytes, "cache_bytes": self.cache_bytes,
                "prefill_bound": self.bound("prefill"), "decode_bound": self.bound("decode"),
                "kind": self.decode.kind}


def predict_generation(graphs: GenerationGraphs, cost_model: CostModel, *, new_tokens: int) -> GenerationPrediction:
    """TTFT, TPOT and the whole generation's time of ``new_tokens`` tokens, predicted by ``cost_model``."""
    if new_tokens < 1:
        raise ValueError("new_tokens must be at least 1")
    device = cost_model.device
    ridge = device.peak_for("fp32") / device.mem_bandwidth_bytes_per_s
    return GenerationPrediction(cost_model.predict(graphs.prefill), cost_model.predict(graphs.decode), new_tokens,
                                graphs.decode.parameter_bytes(), graphs.cache.bytes, ridge)


def weight_streaming_bound_s(weight_bytes: float, bandwidth_bytes_per_s: float, cache_bytes: float = 0.0) -> float:
    """The decode step's floor: every weight (and, given, the cache) read once at ``bandwidth``."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError("bandwidth must be positive")
    return (weight_bytes + cache_bytes) / bandwidth_bytes_per_s
