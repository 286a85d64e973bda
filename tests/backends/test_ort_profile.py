"""ORT's profiler read back per node and grouped as the cost model groups its kernels."""

import json

import pytest
import torch

from tests.tiny import TINY_OVERRIDES
from tfcompile.backends import ort
from tfcompile.backends.ort_profile import (NodeTime, RunProfile, ms_by_group, ms_by_op_type, node_group,
                                            parse_events, profile_runs)
from tfcompile.cost_models.attribution import GROUPS
from tfcompile.graph import export_module


def _run(ts, dur):
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _node(name, op, ts, dur, inputs=(), outputs=()):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
            "args": {"op_name": op, "parameter_size": "0", "input_type_shape": [{"float": list(s)} for s in inputs],
                     "output_type_shape": [{"float": list(s)} for s in outputs]}}


def test_the_warm_up_run_is_dropped_and_node_times_are_per_run():
    events = [_run(0, 9000), _node("mm", "MatMul", 10, 8000),
              _run(10000, 1000), _node("mm", "MatMul", 10010, 600), _node("sm", "Softmax", 10700, 100),
              _run(20000, 1400), _node("mm", "MatMul", 20010, 800), _node("sm", "Softmax", 20900, 300)]
    profile = parse_events(events)
    times = {n.name: n.ms_per_run for n in profile.nodes}
    assert times == pytest.approx({"mm": 0.7, "sm": 0.2})  # (600 + 800) / 2 µs, (100 + 300) / 2 µs
    assert profile.run_ms == pytest.approx(1.2)
    assert profile.between_kernels_ms == pytest.approx(0.3)
    assert ms_by_op_type(profile) == pytest.approx({"MatMul": 0.7, "Softmax": 0.2})
    assert list(ms_by_op_type(profile)) == ["MatMul", "Softmax"]  # largest first


def test_matmuls_of_two_batched_activations_are_attention_and_score_shaped_ops_too():
    score = (1, 4, 16, 16)
    nodes = [NodeTime("qk", "FusedMatMul", 1.0, 0, ((1, 4, 16, 8), (1, 4, 8, 16)), (score,)),
             NodeTime("proj", "MatMul", 2.0, 0, ((1, 16, 32), (32, 32)), ((1, 16, 32),)),  # external weight
             NodeTime("fc", "Gemm", 3.0, 4096, ((16, 32), (32, 32), (32,)), ((16, 32),)),
             NodeTime("mask", "Where", 0.5, 0, ((1, 1, 16, 16), score, (1,)), (score,)),
             NodeTime("probs", "Softmax", 0.25, 0, (score,), (score,)),
             NodeTime("importance", "ReduceSum", 0.125, 0, (score, (2,)), ((1, 16),)),
             NodeTime("norm", "SkipLayerNormalization", 0.75, 256, ((1, 16, 32),) * 2, ((1, 16, 32),)),
             NodeTime("act", "Gelu", 0.0625, 0, ((1, 16, 32),), ((1, 16, 32),)),
             NodeTime("residual", "Add", 0.03125, 0, ((1, 16, 32),) * 2, ((1, 16, 32),))]
    score_shapes = {score}
    groups = {n.name: node_group(n, score_shapes) for n in nodes}
    assert groups == {"qk": "attention", "proj": "weight matmuls", "fc": "weight matmuls", "mask": "attention",
                      "probs": "attention", "importance": "attention", "norm": "norms", "act": "activations",
                      "residual": "other ops"}
    totals = ms_by_group(RunProfile(tuple(nodes), 10.0))
    assert list(totals) == list(GROUPS)
    assert totals["attention"] == pytest.approx(1.875) and totals["weight matmuls"] == pytest.approx(5.0)
    assert totals["between kernels"] == pytest.approx(10.0 - sum(n.ms_per_run for n in nodes))


class _Block(torch.nn.Module):
    """Attention and an FFN with residual adds and LayerNorms, as ORT fuses them in a BERT layer."""

    def __init__(self, width=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)

    def forward(self, x):
        b, s, w = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = self.norm1(x + self.out(attended.transpose(1, 2).reshape(b, s, w)))
        return self.norm2(x + self.down(torch.nn.functional.gelu(self.up(x))))


def test_a_real_profile_of_a_block_puts_each_kernel_in_its_group(tmp_path):
    x = torch.randn(1, 32, 64)
    graph = export_module(_Block().eval(), (x,), name="block")
    path = ort.export_onnx(graph, tmp_path / "block.onnx", external_data=True)
    profile = profile_runs(path, (x,), runs=2)
    ops = ms_by_op_type(profile)
    assert "Softmax" in ops and "Gelu" in ops and "SkipLayerNormalization" in ops, ops
    totals = ms_by_group(profile)
    # Every group the block has ran for some time; the profiler's temporary files are gone.
    assert all(totals[g] > 0 for g in ("weight matmuls", "attention", "norms", "activations")), totals
    assert sum(totals.values()) == pytest.approx(max(profile.run_ms, sum(n.ms_per_run for n in profile.nodes)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.onnx", "block.onnx.data"]


def test_the_decode_step_profile_names_op_types(tmp_path):
    from tfcompile.frontend import zoo
    from tfcompile.generation.measure import profile_decode_step
    from tfcompile.generation.trace import trace_generation

    model = zoo.build("gpt2-small", seed=0, config_overrides=TINY_OVERRIDES["gpt2-small"]).model
    graphs = trace_generation(model, batch=1, prompt_len=4, max_len=8, name="gpt2")
    decode = ort.export_onnx(graphs.decode, tmp_path / "decode.onnx", external_data=True)
    per_op = profile_decode_step(decode, graphs.cache, 4, steps=2)
    assert "MatMul" in per_op or "Gemm" in per_op, per_op
    assert all(ms >= 0 for ms in per_op.values()) and list(per_op.values()) == sorted(per_op.values(), reverse=True)
    json.dumps(per_op)  # plain floats by op type, as benchmarks/generation.py records them
