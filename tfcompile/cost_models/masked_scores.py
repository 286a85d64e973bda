"""How many of an attention's scores its mask hides: entries a softmax meets as -inf, which cost more.

ONNX Runtime's CPU softmax takes a slow path for every -inf it exponentiates.
On session 14's Xeon (2 threads, 12 x 512 x 512 fp32; benchmarks/softmax_masked.py)
a softmax over scores with none masked took 1.67 ms, with half masked 6.65 ms
and with two thirds masked 8.69 ms: a hidden score costs several times a visible one. A causal
decoder hides about half its scores, a local window most of them, and
run-time padding removal's block-diagonal mask all but a few; priced as
unmasked, minilm at 512 tokens with a 128-token window was predicted 1.15x
faster than its baseline and measured 0.93x.

The mask is read from the graph: ``is_causal`` by its shape; a mask tensor by
evaluating the ops that make it (a causal triangle, a band, a padding mask
from the example's lengths) on the graph's example inputs, unless they reach a
GEMM or an attention, or are more than ``MAX_MASK_OPS``. A mask that cannot be
evaluated counts as hiding nothing.
"""

from __future__ import annotations

import torch
import torch.fx

from tfcompile.cost_models.op_costs import attention_mask_node, attention_score_bytes, cost_of, is_causal, output_bytes
from tfcompile.cost_models.score_tensors import explicit_score_passes
from tfcompile.graph import ModelGraph, fetch_attr

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
MAX_MASK_OPS = 256
# A float mask hides a score with -inf or with the dtype's lowest value (Hugging Face's masks).
HIDDEN_BELOW = -1e30


def _cone(node: torch.fx.Node) -> set[torch.fx.Node] | None:
    cone: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in cone:
            continue
        cone.add(current)
        if len(cone) > MAX_MASK_OPS:
            return None
        stack.extend(current.all_input_nodes)
    return cone


def evaluate_mask(graph: ModelGraph, node: torch.fx.Node) -> torch.Tensor | None:
    """``node``'s value on ``graph``'s example inputs, or None when it is too costly or cannot be computed."""
    cone = _cone(node)
    if cone is None:
        return None
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(graph.example_inputs):
        return None
    inputs = dict(zip(placeholders, graph.example_inputs))
    values: dict[torch.fx.Node, object] = {}
    try:
        with torch.no_grad():
            for current in graph.gm.graph.nodes:
                if current not in cone:
                    continue
                if current.op == "placeholder":
                    values[current] = inputs[current]
                elif current.op == "get_attr":
                    values[current] = fetch_attr(graph.gm, current.target)
                elif current.op == "call_function" and cost_of(current).op_class not in ("gemm", "attention"):
                    args = torch.fx.node.map_arg(current.args, values.__getitem__)
                    kwargs = torch.fx.node.map_arg(current.kwargs, values.__getitem__)
                    values[current] = current.target(*args, **kwargs)
                else:
                    return None
    except Exception:  # an op that will not run eagerly outside its graph: the mask stays unknown
        return None
    value = values.get(node)
    return value if isinstance(value, torch.Tensor) else None


def hidden_fraction(mask: torch.Tensor) -> float:
    """Share of the entries a boolean (False) or additive (-inf, or the dtype's lowest) mask hides."""
    hidden = ~mask if mask.dtype == torch.bool else mask < HIDDEN_BELOW
    return float(hidden.float().mean()) if mask.numel() else 0.0


def _causal_fraction(queries: int, keys: int) -> float:
    """``is_causal`` keeps key j for query i when j <= i (torch's top-left alignment)."""
    kept = sum(min(i + 1, keys) for i in range(queries))
    return 1.0 - kept / (queries * keys)


def masked_score_bytes(graph: ModelGraph) -> float:
    """Bytes of score entries the graph's attentions hide from their softmax (SDPAs, and masked_fill or
    where over explicit score tensors)."""
    total = 0.0
    explicit = explicit_score_passes(graph)
    for node in graph.call_nodes():
        if node.target is SDPA:
            mask = attention_mask_node(node)
            if mask is not None:
                value = evaluate_mask(graph, mask)
                fraction = hidden_fraction(value) if value is not None else 0.0
            elif is_causal(node):
                q, k = node.args[0].meta["val"], node.args[1].meta["val"]
                fraction = _causal_fraction(q.shape[-2], k.shape[-2])
            else:
                continue
            total += fraction * attention_score_bytes(node)
        elif node.target is aten.masked_fill.Scalar and node.name in explicit:
            value = evaluate_mask(graph, node.args[1])  # True where the fill (-inf) goes
            if value is not None and float(node.args[2]) < HIDDEN_BELOW:
                total += hidden_fraction(value.logical_not()) * output_bytes(node)
    return total
