import pytest
import torch

from tfcompile.cost_models import available_targets, estimate, load_device
from tfcompile.cost_models.op_costs import cost_of
from tfcompile.errors import UnknownTargetError
from tfcompile.graph import export_module
from tests.tiny import load_tiny


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 256)
        self.norm = torch.nn.LayerNorm(256)

    def forward(self, x):
        return (self.norm(self.fc(x)).transpose(0, 1),)


def _graph():
    return export_module(Block(), (torch.randn(8, 64),), name="block")


def _node(graph, target):
    return next(n for n in graph.call_nodes() if n.target is target)


def test_linear_formula_is_2mnk():
    graph = _graph()
    cost = cost_of(_node(graph, torch.ops.aten.linear.default))
    assert cost.flops == 2 * 8 * 64 * 256
    assert cost.bytes_read == 4 * (8 * 64 + 64 * 256 + 256)
    assert cost.bytes_written == 4 * 8 * 256
    assert cost.op_class == "gemm"


def test_views_cost_nothing():
    graph = _graph()
    assert cost_of(_node(graph, torch.ops.aten.transpose.int)).op_class == "free"


def test_sdpa_formula():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return (torch.nn.functional.scaled_dot_product_attention(q, k, v),)

    q = torch.randn(2, 4, 32, 16)
    graph = export_module(Attn(), (q, q, q), name="attn")
    cost = cost_of(_node(graph, torch.ops.aten.scaled_dot_product_attention.default))
    assert cost.flops == 2 * 8 * 32 * 32 * 32 + 5 * 8 * 32 * 32


def _attention_graph(seq: int):
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return (torch.nn.functional.scaled_dot_product_attention(q, k, v),)

    q = torch.randn(1, 2, seq, 8)
    return export_module(Attn(), (q, q, q), name="attn")


def test_unfused_attention_pays_for_its_score_tensor_once_it_leaves_the_cache():
    import dataclasses

    cpu = load_device("cpu")
    assert cpu.attention_score_passes > 0 and cpu.cache_bytes > 0
    cpu = dataclasses.replace(cpu, cache_bytes=1 << 20)  # 1 MiB, so a small test reaches past it
    seq = 512  # 2 heads × 512 × 512 × 4 B = 2 MiB of scores
    long = estimate(_attention_graph(seq), cpu)
    traffic = [k for k in long.kernels if k.node.endswith(".scores")]
    assert len(traffic) == 1
    assert traffic[0].bytes_moved == cpu.attention_score_passes * 2 * seq * seq * 4
    assert traffic[0].latency_s > 0
    # 2 × 256 × 256 × 4 B = 0.5 MiB stays in cache: no extra kernel.
    assert not [k for k in estimate(_attention_graph(256), cpu).kernels if k.node.endswith(".scores")]
    # GPUs run fused (flash) attention: the scores never reach DRAM.
    a100 = load_device("a100")
    assert a100.attention_score_passes == 0
    assert not [k for k in estimate(_attention_graph(seq), a100).kernels if k.node.endswith(".scores")]


def test_last_level_cache_is_read_from_sysfs(tmp_path):
    from tfcompile.cost_models.device import last_level_cache_bytes

    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "32768K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert last_level_cache_bytes(tmp_path) == 32 * 2**20
    assert last_level_cache_bytes(tmp_path / "missing") == 0


def test_every_target_loads_with_sources():
    assert {"a100", "h100", "cpu", "npu", "edge"} <= set(available_targets())
    for name in available_targets():
        device = load_device(name)
        assert device.peak_for("fp32") > 0 and device.mem_bandwidth_bytes_per_s > 0
        assert device.sources, f"{name} has no sources"


def test_unknown_target():
    with pytest.raises(UnknownTargetError, match="known targets: a100"):
        load_device("tpu9000")


def test_roofline_orders_devices_by_regime():
    h100, cpu = load_device("h100"), load_device("cpu")
    big_gemm = export_module(torch.nn.Linear(2048, 2048), (torch.randn(512, 2048),), name="gemm")
    assert estimate(big_gemm, h100).latency_s * 100 < estimate(big_gemm, cpu).latency_s
    # A tiny model is launch-bound: eager GPU launches (8.5 us) cost more than CPU ops (5.8 us).
    tiny = load_tiny("bert-base", seq=16)
    assert all(k.bound == "overhead" for k in estimate(tiny, h100).kernels)
    assert estimate(tiny, h100).latency_s > estimate(tiny, cpu).latency_s


def test_roofline_scales_with_work():
    small, large = load_tiny("bert-base", seq=16), load_tiny("bert-base", seq=64)
    cpu = load_device("cpu")
    assert estimate(large, cpu).flops > 3 * estimate(small, cpu).flops
    assert estimate(large, cpu).latency_s > estimate(small, cpu).latency_s


def test_npu_pays_overhead_once_per_graph():
    graph = _graph()
    npu = load_device("npu")
    result = estimate(graph, npu)
    assert result.latency_s >= npu.kernel_overhead_s
    assert result.latency_s < 2 * npu.kernel_overhead_s


def test_einsum_formula_counts_the_contraction():
    class Ein(torch.nn.Module):
        def forward(self, a, b):
            return (torch.einsum("bkp,kqp->bkq", a, b),)

    graph = export_module(Ein(), (torch.randn(8, 4, 16), torch.randn(4, 32, 16)), name="ein")
    node = next(n for n in graph.call_nodes() if "einsum" in str(n.target))
    cost = cost_of(node)
    assert cost.flops == 2 * 8 * 4 * 16 * 32
    assert cost.op_class == "gemm"
