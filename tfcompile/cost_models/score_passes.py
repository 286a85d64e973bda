"""The bytes an unfused attention moves over its score tensors, per kind (``op_costs.SCORE_PASS_KINDS``).

Three sources add up: an SDPA's passes as ORT runs it unfused
(``op_costs.unfused_score_bytes``), an attention written out op by op
(``score_tensors``), and the entries a mask hides from the softmax
(``masked_scores``).
"""

from __future__ import annotations

from tfcompile.cost_models.device import known_device
from tfcompile.cost_models.fusion import UNFUSED_ATTENTION_BACKENDS
from tfcompile.cost_models.masked_scores import masked_score_bytes
from tfcompile.cost_models.op_costs import unfused_score_bytes
from tfcompile.cost_models.roofline import score_traffic_bytes
from tfcompile.cost_models.score_tensors import explicit_score_bytes


def score_pass_bytes(graph, backend: str) -> dict[str, float]:
    """Bytes the unfused attentions of ``graph`` move over their score tensors on ``backend``, per pass kind
    (``op_costs.SCORE_PASS_KINDS``); {} when the backend runs attention fused."""
    totals: dict[str, float] = {}
    if backend in UNFUSED_ATTENTION_BACKENDS:
        for node in graph.call_nodes():
            for kind, size in unfused_score_bytes(node).items():
                totals[kind] = totals.get(kind, 0.0) + size
        for kind, size in explicit_score_bytes(graph).items():
            totals[kind] = totals.get(kind, 0.0) + size
        hidden = masked_score_bytes(graph)
        if hidden:
            totals["score_masked"] = hidden
    return totals


def attention_traffic_bytes(graph, target: str, backend: str, cache_bytes: float | None = None) -> float:
    """Score-tensor bytes of every attention in ``graph`` on ``backend`` beyond ``cache_bytes`` (default: the
    last-level cache: DRAM's traffic); 0 when fused."""
    device = known_device(target) if backend in UNFUSED_ATTENTION_BACKENDS else None
    if device is None or not device.attention_score_passes:
        return 0.0
    return float(sum(score_traffic_bytes(node, device, cache_bytes) for node in graph.call_nodes()))
