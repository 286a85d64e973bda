"""A prediction split the way a runtime's profile can be: per group of ops, in milliseconds.

A variant predicted 20 % off says nothing of where; the same prediction split
into the groups below, beside the runtime's own per-node times grouped alike
(``backends.ort_profile``, ``compare.attribute``), names the ops the cost
model misprices. The groups are coarse on purpose: the kernels the cost model
prices (``fusion.group_kernels``) and the nodes ORT runs after its own fusions
are not one to one, but both sides can say which of these each belongs to.

- "weight matmuls": GEMMs with a weight operand (linear layers, convolutions);
- "attention": the attention's matmuls, softmax, and every pass over its score
  tensor (mask, guard, hidden entries, reductions over the probabilities);
- "norms": layer and RMS norms the runtime runs as one kernel;
- "activations": the activations the runtime runs as a kernel of their own (GELU on ORT);
- "other ops": elementwise ops, gathers, scatters, copies and views outside attention;
- "between kernels": the runtime's time outside its kernels; the cost model's
  per-graph overhead (its per-kernel overhead stays with each kernel).

The groups of a calibrated prediction are ``Profile.parts_s``, the terms ``Profile.predict_s`` adds.
"""

from __future__ import annotations

from tfcompile.cost_models.calibration import Profile, kernel_class, streams_weights
from tfcompile.cost_models.fusion import UNFUSED_ATTENTION_BACKENDS
from tfcompile.cost_models.roofline import estimate
from tfcompile.cost_models.score_tensors import explicit_score_passes

GROUPS = ("weight matmuls", "attention", "norms", "activations", "other ops", "between kernels")

_CLASS_GROUP = {"gemm": "weight matmuls", "gemm_skinny": "weight matmuls", "gemm_stream": "weight matmuls",
                "attention": "attention", "softmax": "attention", "norm": "norms", "norm_residual": "norms",
                "activation": "activations",
                "memory": "other ops", "scatter": "other ops", "view": "other ops"}


def predicted_ms_by_group(graph, cost_model) -> dict[str, float]:
    """``cost_model``'s prediction for ``graph`` per group (``GROUPS``), in milliseconds."""
    profile = getattr(cost_model, "profile", None)
    if isinstance(profile, Profile):
        return _calibrated(graph, profile, cost_model.flop_speedup)
    totals = dict.fromkeys(GROUPS, 0.0)
    for kernel in estimate(graph, cost_model.device).kernels:
        # The roofline's extra kernel for an unfused attention's score traffic is named "<sdpa>.scores".
        group = "attention" if kernel.node.endswith(".scores") else _CLASS_GROUP.get(kernel.op_class, "other ops")
        totals[group] += kernel.latency_s * 1e3
    return totals


def _calibrated(graph, profile: Profile, flop_speedup: dict[str, float]) -> dict[str, float]:
    totals = dict.fromkeys(GROUPS, 0.0)
    streaming = streams_weights(graph, profile.target)
    explicit = explicit_score_passes(graph) if profile.backend in UNFUSED_ATTENTION_BACKENDS else {}
    for part, seconds in profile.parts_s(graph, flop_speedup):
        if part == "graph overhead":
            group = "between kernels"
        elif isinstance(part, str) or any(name in explicit for name in part.nodes):  # score traffic and passes
            group = "attention"
        else:
            group = _CLASS_GROUP.get(kernel_class(part, streaming), "other ops")
        totals[group] += seconds * 1e3
    return totals


def furthest_off(predicted_ms: dict[str, float], measured_ms: dict[str, float]) -> tuple[str, float]:
    """The group whose predicted time is furthest from its measured one, and by how many milliseconds
    (predicted less measured: negative when the model prices it too cheap)."""
    group = max(GROUPS, key=lambda g: abs(predicted_ms.get(g, 0.0) - measured_ms.get(g, 0.0)))
    return group, predicted_ms.get(group, 0.0) - measured_ms.get(group, 0.0)
