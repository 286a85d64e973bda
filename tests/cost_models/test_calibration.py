import dataclasses
import statistics
import json

import pytest
import torch

from tfcompile.compare import ComparisonRow, lowest_of_passes, score
from tfcompile.cost_models.calibration import CLASSES, Profile, features, fit, kernel_class
from tfcompile.cost_models.device import known_device
from tfcompile.cost_models.fusion import group_kernels
from tfcompile.cost_models.score_passes import attention_traffic_bytes
from tfcompile.errors import TfcompileError
from tfcompile.graph import export_module


class Mlp(torch.nn.Module):
    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.up = torch.nn.Linear(d, hidden)
        self.down = torch.nn.Linear(hidden, d)

    def forward(self, x):
        return (self.down(torch.nn.functional.gelu(self.up(x))) + x,)


def _mlp(rows=8, d=32, hidden=64):
    return export_module(Mlp(d, hidden), (torch.randn(rows, d),), name=f"mlp{rows}x{d}x{hidden}")


def test_gelu_epilogue_fuses_into_gemm_for_tvm_and_is_its_own_activation_kernel_on_ort():
    graph = _mlp()
    tvm_kernels = group_kernels(graph, "tvm")
    torch_kernels = group_kernels(graph, "torch")
    ort_kernels = group_kernels(graph, "ort")
    assert len(torch_kernels) == 4  # linear, gelu, linear, add
    # linear+gelu, linear+add: the residual add reads x besides, inside the second GEMM's epilogue (FuseOps)
    assert [k.nodes for k in tvm_kernels] == [["linear", "gelu"], ["linear_1", "add"]]
    fused = tvm_kernels[0]
    assert fused.op_class == "gemm"
    unfused_bytes = sum(k.bytes_moved for k in torch_kernels[:2])
    # The GEMM output no longer goes to memory and back.
    assert fused.bytes_moved == unfused_bytes - 2 * 4 * 8 * 64
    # ORT's Gelu node reads the GEMM's output and writes its own, in a class of its own.
    assert [k.op_class for k in ort_kernels] == ["gemm", "activation", "gemm", "memory"]
    assert ort_kernels[1].bytes_moved == torch_kernels[1].bytes_moved == 2 * 4 * 8 * 64
    assert [kernel_class(k) for k in torch_kernels] == ["gemm_skinny", "memory", "gemm_skinny", "memory"]


def test_tvm_runs_the_gelu_after_a_linear_over_tokens_as_a_kernel_of_its_own():
    # A linear over [B, S, K] is reshape, matmul, reshape in Relax: FuseOps stops at the reshape.
    graph = export_module(Mlp(32, 64), (torch.randn(2, 4, 32),), name="mlp3d")
    assert [k.op_class for k in group_kernels(graph, "tvm")] == ["gemm", "activation", "gemm", "memory"]
    assert [k.op_class for k in group_kernels(_mlp(), "tvm")][:2] == ["gemm", "gemm"]  # 2-D: the epilogue


class _Conv1DMlp(torch.nn.Module):
    """GPT-2's MLP: Conv1D is an addmm over [B*S, K] viewed back to [B, S, N]; GELU written out with a tanh."""

    def __init__(self, d: int = 32, hidden: int = 64):
        super().__init__()
        self.w_in, self.b_in = torch.nn.Parameter(torch.randn(d, hidden)), torch.nn.Parameter(torch.randn(hidden))
        self.w_out, self.b_out = torch.nn.Parameter(torch.randn(hidden, d)), torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        h = torch.addmm(self.b_in, x.view(-1, x.shape[-1]), self.w_in).view(*x.shape[:-1], -1)
        h = 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0))))
        return torch.addmm(self.b_out, h.view(-1, h.shape[-1]), self.w_out).view(x.shape) + x


def test_tvm_ends_a_gemm_kernel_at_the_view_back_to_tokens_and_prices_a_tanh_chain_as_an_activation():
    graph = export_module(_Conv1DMlp(), (torch.randn(2, 4, 32),), name="conv1d_mlp")
    kernels = group_kernels(graph, "tvm")
    # The GELU's two branches (0.5 * h and the tanh of a cubic) are two kernels here; FuseOps makes them one.
    assert [k.op_class for k in kernels] == ["gemm", "memory", "activation", "gemm", "memory"]
    assert kernels[0].nodes == ["addmm"] and "tanh" in kernels[2].nodes
    assert kernels[3].nodes == ["addmm_1"] and kernels[4].nodes == ["add_2"]  # the residual add reads the view
    # The same ops without views of another shape in between: the residual add is the GEMM's epilogue.
    flat = group_kernels(export_module(_Conv1DMlp(), (torch.randn(8, 32),), name="conv1d_mlp_2d"), "tvm")
    assert [k.op_class for k in flat] == ["gemm", "memory", "activation", "gemm"]
    assert flat[3].nodes == ["addmm_1", "add_2"]


def test_a_profile_without_the_activation_class_prices_gelu_as_elementwise():
    kernel = group_kernels(_mlp(), "ort")[1]
    old = Profile(target="cpu", backend="ort", s_per_flop={"memory": 1e-9}, s_per_byte={"memory": 1e-10},
                  kernel_overhead_s=0.0, graph_overhead_s=0.0)
    assert old.kernel_s(kernel) == pytest.approx(1e-9 * kernel.flops + 1e-10 * kernel.bytes_moved)
    fitted = dataclasses.replace(old, s_per_flop={"memory": 1e-9, "activation": 4e-9})
    assert fitted.kernel_s(kernel) == pytest.approx(4e-9 * kernel.flops + 0.0 * kernel.bytes_moved)


def test_skinny_gemms_get_their_own_class():
    kernels = group_kernels(_mlp(rows=4), "torch")
    assert kernel_class(kernels[0]) == "gemm_skinny"
    assert kernel_class(group_kernels(_mlp(rows=128), "torch")[0]) == "gemm"


def test_skinny_gemms_over_weights_larger_than_the_cache_stream(monkeypatch):
    from tfcompile.cost_models import calibration

    small = _mlp(rows=1)
    device = known_device("cpu")
    assert not calibration.streams_weights(small, "cpu")  # 8 KiB of weights stay in any last-level cache
    monkeypatch.setattr(calibration, "known_device", lambda target: dataclasses.replace(device, cache_bytes=1024))
    assert calibration.streams_weights(small, "cpu")
    kernel = group_kernels(small, "ort")[0]
    assert kernel_class(kernel, streaming=True) == "gemm_stream"
    # A profile fitted before the class existed prices streamed GEMMs as skinny ones, not as free.
    old = Profile(target="cpu", backend="ort", s_per_flop={"gemm_skinny": 1e-10}, s_per_byte={},
                  kernel_overhead_s=0.0, graph_overhead_s=0.0)
    assert old.kernel_s(kernel, streaming=True) == old.kernel_s(kernel) > 0


def test_wide_gemms_over_weights_larger_than_the_cache_cost_at_least_their_weights_from_dram(monkeypatch):
    """A prefill's GEMMs read weights the cache cannot hold, but reuse each for every row: they cost the
    larger of their own class's cost and that DRAM read (a roofline max), and the fit's features leave the
    read out (the compute side is the larger for every row count of the class)."""
    from tfcompile.cost_models import calibration

    wide = _mlp(rows=128)
    kernel = group_kernels(wide, "ort")[0]
    assert kernel.weight_bytes == 4 * (64 * 32 + 64)  # up's weight and bias; not the activations
    assert calibration.streamed_weight_bytes(kernel, streaming=False) == 0.0
    assert calibration.streamed_weight_bytes(kernel, streaming=True) == kernel.weight_bytes
    skinny = group_kernels(_mlp(rows=4), "ort")[0]
    assert calibration.streamed_weight_bytes(skinny, streaming=True) == 0.0  # its class prices every byte already

    compute_bound = Profile(target="cpu", backend="ort", s_per_flop={"gemm": 1e-11},
                            s_per_byte={"gemm_stream": 1e-12}, kernel_overhead_s=0.0, graph_overhead_s=0.0)
    cached = compute_bound.kernel_s(kernel, streaming=False)
    assert cached == pytest.approx(1e-11 * kernel.flops)
    assert 1e-12 * kernel.weight_bytes < cached  # the read hides behind the compute: it adds nothing
    assert compute_bound.kernel_s(kernel, streaming=True) == pytest.approx(cached)
    slow_dram = dataclasses.replace(compute_bound, s_per_byte={"gemm_stream": 1e-8})
    assert 1e-8 * kernel.weight_bytes > cached  # a DRAM too slow to hide: the read is the floor
    assert slow_dram.kernel_s(kernel, streaming=True) == pytest.approx(1e-8 * kernel.weight_bytes)

    device = known_device("cpu")
    monkeypatch.setattr(calibration, "known_device", lambda target: dataclasses.replace(device, cache_bytes=1024))
    assert calibration.streams_weights(wide, "cpu")
    streamed_row = features(wide, "ort", "cpu")
    assert streamed_row[2 * CLASSES.index("gemm_stream") + 1] == 0.0
    monkeypatch.setattr(calibration, "known_device", lambda target: device)
    assert (streamed_row == features(wide, "ort", "cpu")).all()


@pytest.mark.parametrize("cache_mib", [8, 32, 105])
def test_streaming_micro_benchmarks_outgrow_the_measured_cache(cache_mib):
    """A 64 MB benchmark sat in a 105 MiB cache and priced DRAM streaming at cache speed."""
    from tfcompile.calibrate import STREAM_STACKS, default_suite, streaming_depth

    cache = cache_mib * 2**20
    names = [b.name for b in default_suite(cache) if b.name.startswith("stream_")]
    assert len(names) == 3 + len(STREAM_STACKS)
    assert any(name.endswith("_s128") for name in names)  # a prefill's rows, not only one token
    for width, _heads, _rows in STREAM_STACKS:
        depth = streaming_depth(width, cache)
        stack = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(width, 8, 4 * width) for _ in range(depth))
        assert sum(p.numel() * 4 for p in stack.parameters()) >= 2 * cache
    linear = next(n for n in names if n.startswith("stream_linear_m1_k4096"))
    assert 4096 * int(linear.rsplit("_n", 1)[1]) * 4 >= 2 * cache


@dataclasses.dataclass
class _Sample:
    name: str
    graph: object
    measured_s: float


def _known_profile(backend: str, gemm_s_per_flop: float) -> Profile:
    """Coefficients to generate samples from: a fit must find them again."""
    return Profile(target="cpu", backend=backend,
                   s_per_flop={c: 0.0 for c in CLASSES} | {"gemm": gemm_s_per_flop, "gemm_skinny": 9e-11},
                   s_per_byte={c: 0.0 for c in CLASSES} | {"memory": 3e-10},
                   kernel_overhead_s=4e-6, graph_overhead_s=2e-5)


def _mlp_sweep() -> list:
    return [_mlp(r, d, h) for r in (4, 16, 128, 512) for d, h in ((32, 64), (64, 256), (128, 128))]


def test_fit_recovers_known_coefficients():
    truth = _known_profile("torch", 2e-11)
    graphs = _mlp_sweep()
    samples = [_Sample(g.name, g, truth.predict_s(g)) for g in graphs]
    fitted = fit(samples, "cpu", "torch")
    assert fitted.fit_mape < 1e-6
    for g in graphs:
        assert fitted.predict_s(g) == pytest.approx(truth.predict_s(g), rel=1e-6)


def test_profile_round_trip_and_version_check():
    graph = _mlp()
    profile = fit([_Sample("a", graph, 1e-4), _Sample("b", _mlp(64), 3e-4)], "cpu", "ort")
    again = Profile.from_json(profile.to_json())
    assert again.predict_s(graph) == pytest.approx(profile.predict_s(graph))
    data = json.loads(profile.to_json())
    data["version"] = 999
    with pytest.raises(TfcompileError, match="recalibrate"):
        Profile.from_json(json.dumps(data))
    with pytest.raises(TfcompileError, match="invalid JSON"):
        Profile.from_json("not json")


def test_features_count_kernels_and_graph():
    row = features(_mlp(), "torch")
    assert row[-1] == 1 and row[-2] == 4


def test_scores():
    rows = [ComparisonRow("a", 10.0, {"roofline": 11.0}), ComparisonRow("b", 20.0, {"roofline": 30.0}),
            ComparisonRow("c", 40.0, {"roofline": 38.0})]
    s = score(rows)["roofline"]
    assert s["mape"] == pytest.approx((0.1 + 0.5 + 0.05) / 3)
    assert s["within_10pct"] == pytest.approx(2 / 3)
    assert s["kendall_tau"] == pytest.approx(1.0)


def test_lowest_of_passes_keeps_each_variants_lowest_median_in_first_pass_order():
    first = [ComparisonRow("a", 10.0, {"roofline": 9.0}), ComparisonRow("b", 30.0, {"roofline": 20.0})]
    second = [ComparisonRow("b", 21.0, {"roofline": 20.0}), ComparisonRow("a", 12.0, {"roofline": 9.0})]
    rows = lowest_of_passes([first, second])
    assert [(r.name, r.measured_ms) for r in rows] == [("a", 10.0), ("b", 21.0)]


def test_measured_speedup_is_the_median_over_passes_of_each_pass_ratio_of_medians():
    from tfcompile.compare import measured_speedup

    def rows(base_runs, variant_runs):
        return [ComparisonRow("m baseline", statistics.median(base_runs), {}, (base_runs,)),
                ComparisonRow("m v", statistics.median(variant_runs), {}, (variant_runs,))]

    # Pass 1 at full speed, with a spike on the variant's side; pass 2 at half speed; pass 3 while a neighbour
    # slowed the first half of the turns. Per pass the variant takes 0.8 of its baseline's time.
    passes = [rows((10.0, 10.1, 9.9), (8.0, 30.0, 7.9)), rows((20.0, 20.2, 19.8), (16.0, 16.1, 15.9)),
              rows((30.0, 10.0, 10.0), (24.0, 8.0, 8.0))]
    base, variant = lowest_of_passes(passes)
    assert len(variant.samples_ms) == len(base.samples_ms) == 3
    assert measured_speedup(variant, base) == pytest.approx(1.25)
    # The lowest medians can come from different passes (the baseline's from pass 1, the variant's from pass 2)
    # and then say 1.00x, where the pass in the middle of the three says 1.05x.
    passes = [rows((10.0,) * 3, (12.0,) * 3), rows((14.0,) * 3, (10.0,) * 3), rows((11.0,) * 3, (10.5,) * 3)]
    base, variant = lowest_of_passes(passes)
    assert base.measured_ms / variant.measured_ms == 1.0
    assert measured_speedup(variant, base) == pytest.approx(11.0 / 10.5)
    # Rows without runs of their own, or whose runs were not timed in the same turns, fall back to the medians.
    assert measured_speedup(ComparisonRow("m v", 5.0, {}), ComparisonRow("m baseline", 10.0, {})) == 2.0
    assert measured_speedup(ComparisonRow("m v", 5.0, {}, ((5.0, 5.0),)),
                            ComparisonRow("m baseline", 10.0, {}, ((20.0,),))) == 2.0


def test_block_micro_benchmarks_cover_a_layers_kernel_classes_at_non_zoo_widths():
    from tfcompile.calibrate import BLOCK_CONFIGS, default_suite

    zoo_widths = {384, 768}  # minilm, bert/gpt2/vit; llama-tiny is narrower still
    assert all(width not in zoo_widths for width, *_ in BLOCK_CONFIGS)
    blocks = [b for b in default_suite() if b.name.startswith("blocks_")]
    assert len(blocks) == len(BLOCK_CONFIGS)
    module, inputs = blocks[0].build()
    graph = export_module(module, inputs, name=blocks[0].name)
    classes = {kernel_class(k) for k in group_kernels(graph, "ort")}
    assert {"gemm", "attention", "norm"} <= classes


def test_variants_of_one_shape_are_timed_round_robin(monkeypatch):
    import tfcompile.compare as compare
    import tfcompile.measure as measure
    from tfcompile.backends.timing import Measurement
    from tfcompile.cost_models import load_device
    from tfcompile.cost_models.model import RooflineCostModel

    calls = []
    timed = Measurement("torch", 1e-3, (1e-3,))
    monkeypatch.setattr(measure, "measure_interleaved",
                        lambda runs, **kw: calls.append(("interleaved", len(runs))) or {k: timed for k in runs})
    monkeypatch.setattr(measure, "measure", lambda run, **kw: calls.append(("alone", 1)) or timed)
    graphs = [_mlp(rows=4), _mlp(rows=4), _mlp(rows=8)]
    group = {id(graphs[0]): "a", id(graphs[1]): "a", id(graphs[2]): "b"}
    rows = compare.measure_and_predict(graphs, cost_model=RooflineCostModel(load_device("cpu"), "torch"), repeat=1,
                                       group_key=lambda g: group[id(g)])
    assert [r.name for r in rows] == [g.name for g in graphs]
    assert all(r.measured_ms == 1.0 for r in rows)
    assert calls == [("interleaved", 2), ("alone", 1)]


def test_unfused_backends_pay_attention_score_traffic_beyond_the_cache(monkeypatch):
    from tfcompile.cost_models import calibration, load_device, score_passes

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return (torch.nn.functional.scaled_dot_product_attention(q, k, v),)

    q = torch.randn(1, 2, 512, 8)
    graph = export_module(Attn(), (q, q, q), name="attn")
    small_cache = dataclasses.replace(load_device("cpu"), cache_bytes=1 << 20)  # scores are 2 MiB
    monkeypatch.setattr(score_passes, "known_device", lambda target: small_cache)
    traffic = small_cache.attention_score_passes * 2 * 512 * 512 * 4
    coefficients = dict(s_per_flop={c: 1e-12 for c in CLASSES}, s_per_byte={c: 1e-10 for c in CLASSES},
                        kernel_overhead_s=0.0, graph_overhead_s=0.0)
    ort, torch_eager = Profile("cpu", "ort", **coefficients), Profile("cpu", "torch", **coefficients)
    assert attention_traffic_bytes(graph, "cpu", "ort") == traffic
    assert attention_traffic_bytes(graph, "cpu", "torch") == 0  # a fused SDPA kernel
    extra = ort.predict_s(graph) - sum(ort.kernel_s(k) for k in group_kernels(graph, "ort"))
    assert extra == pytest.approx(1e-10 * (traffic + sum(calibration.score_pass_bytes(graph, "ort").values())))
    assert torch_eager.predict_s(graph) == pytest.approx(sum(torch_eager.kernel_s(k)
                                                             for k in group_kernels(graph, "torch")))
    row = features(graph, "ort", "cpu")
    assert row[2 * CLASSES.index("memory") + 1] >= traffic
    # A device whose attention is fused (a GPU) adds nothing.
    monkeypatch.setattr(score_passes, "known_device", lambda target: load_device("a100"))
    assert attention_traffic_bytes(graph, "a100", "ort") == 0


@pytest.mark.parametrize("mask, kinds", [(None, {"scores": 4}), ("additive", {"scores": 4, "score_mask": 1}),
                                         # is_causal hides 63 of every 128 scores of a 64-token square
                                         ("causal", {"scores": 4, "score_mask": 1, "score_masked": 63 / 128}),
                                         ("boolean", {"scores": 4, "score_mask": 1, "score_guard": 1})])
def test_unfused_attention_pays_for_each_pass_its_mask_makes_over_the_scores(mask, kinds):
    """ORT runs SDPA as MatMul, Softmax, MatMul, plus an Add for a mask and IsNaN + Where for a boolean one."""
    from tfcompile.cost_models import calibration

    seq = 64
    masks = {"additive": torch.zeros(1, 1, seq, seq), "boolean": torch.ones(1, 1, seq, seq, dtype=torch.bool)}

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            if mask == "causal":
                return (torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),)
            return (torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=masks.get(mask)),)

    q = torch.randn(2, 3, seq, 8)
    graph = export_module(Attn(), (q, q, q), name=f"attn_{mask}")
    score_bytes = 2 * 3 * seq * seq * 4
    expected = {kind: passes * score_bytes for kind, passes in kinds.items()}
    assert calibration.score_pass_bytes(graph, "ort") == expected
    assert calibration.score_pass_bytes(graph, "tvm") == expected
    assert calibration.score_pass_bytes(graph, "torch") == {}  # one fused kernel
    row = features(graph, "ort", "cpu")
    assert {kind: row[2 * CLASSES.index(kind) + 1] for kind in expected} == expected
    rates = {"scores": 1e-10, "score_mask": 3e-10, "score_guard": 5e-10, "score_masked": 7e-10}
    profile = Profile("cpu", "ort", s_per_flop={}, s_per_byte=rates, kernel_overhead_s=0.0, graph_overhead_s=0.0)
    assert profile.predict_s(graph) == pytest.approx(sum(rates[kind] * size for kind, size in expected.items()))


def test_held_out_check_compares_the_fit_with_the_roofline_on_kernels_it_did_not_see():
    from tfcompile.cost_models.calibration import fit_checked, improves_on_roofline

    truth = _known_profile("ort", 3e-11)
    graphs = _mlp_sweep()
    profile = fit_checked([_Sample(g.name, g, truth.predict_s(g)) for g in graphs], "cpu", "ort")
    assert profile.heldout_mape < 0.05 < profile.heldout_roofline_mape  # the truth is no roofline
    assert improves_on_roofline(profile)
    assert not improves_on_roofline(dataclasses.replace(profile, heldout_mape=profile.heldout_roofline_mape * 2))


def test_speedup_scores_compare_each_variant_with_the_baseline_at_its_shape():
    from tfcompile.compare import speedup_scores

    rows = [ComparisonRow("m b1 s128 baseline", 10.0, {"roofline": 10.0}),
            ComparisonRow("m b1 s128 cleanup", 5.0, {"roofline": 9.0}),  # 2.00x measured, 1.11x predicted
            ComparisonRow("m b8 s128 baseline", 40.0, {"roofline": 40.0}),
            ComparisonRow("m b8 s128 cleanup", 40.0, {"roofline": 40.0}),  # 1.00x, 1.00x
            # Another model at the same shape is compared with its own baseline, not m's.
            ComparisonRow("n b1 s128 baseline", 1.0, {"roofline": 1.0})]
    scores = speedup_scores(rows)["roofline"]
    assert scores["variants"] == 2
    assert scores["median_error_pp"] == pytest.approx((200 - 1000 / 9 + 0) / 2)
    assert scores["worst"]["variant"] == "m b1 s128 cleanup"
    assert scores["worst"]["measured_speedup"] == 2.0


class _Scatters(torch.nn.Module):
    def forward(self, values, slot):
        rows = values.new_zeros(8, values.shape[1])
        summed = rows.index_put([slot.view(-1, 1), torch.arange(values.shape[1]).unsqueeze(0)], values,
                                accumulate=True)
        return summed, rows.index_put([slot[:8]], values[:8])  # the second overwrites: a copy, not a sum


@pytest.mark.parametrize("backend", ["ort", "tvm", "torch"])
def test_accumulating_scatters_are_a_class_of_their_own(backend):
    graph = export_module(_Scatters(), (torch.randn(16, 4), torch.randint(0, 8, (16,))), name="scatters")
    puts = [k for k in group_kernels(graph, backend) if any(n.startswith("index_put") for n in k.nodes)]
    assert sorted(k.op_class for k in puts) == ["memory", "scatter"]
    # A profile fitted before the class prices a scatter as memory, and a reduction over scores as a mask pass.
    old = Profile(target="cpu", backend=backend, s_per_flop={"memory": 1e-9}, s_per_byte={"memory": 1e-10,
                  "score_mask": 3e-10}, kernel_overhead_s=0.0, graph_overhead_s=0.0)
    scatter = next(k for k in puts if k.op_class == "scatter")
    assert old.kernel_s(scatter) == pytest.approx(1e-9 * scatter.flops + 1e-10 * scatter.bytes_moved)
    assert old.byte_s("score_reduce") == 3e-10 and old.byte_s("scatter") == 1e-10


class _SwiGlu(torch.nn.Module):
    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.gate, self.up, self.down = (torch.nn.Linear(d, hidden), torch.nn.Linear(d, hidden),
                                         torch.nn.Linear(hidden, d))

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def test_silu_is_an_activation_kernel_on_ort_as_its_quick_gelu_node_is(tmp_path):
    """ORT runs a Llama FFN's SiLU as a QuickGelu node of its own; TVM fuses it into the gate GEMM."""
    from tfcompile.backends import ort
    from tfcompile.backends.ort_profile import ms_by_group, profile_runs

    x = torch.randn(8, 32)
    graph = export_module(_SwiGlu().eval(), (x,), name="swiglu")
    assert [k.op_class for k in group_kernels(graph, "ort")].count("activation") == 1
    assert "activation" not in [k.op_class for k in group_kernels(graph, "tvm")]
    path = ort.export_onnx(graph, tmp_path / "swiglu.onnx")
    profile = profile_runs(path, (x,), runs=1)
    assert [n.op_type for n in profile.nodes].count("QuickGelu") == 1
    assert ms_by_group(profile)["activations"] > 0


def test_stacks_of_layers_weigh_as_much_in_the_fit_as_the_isolated_kernels():
    from tfcompile.cost_models.calibration import composite_weights

    weights = composite_weights(["linear_m1", "gelu_1", "softmax_1", "blocks_d1", "stream_blocks_d2", "chain_1"])
    assert list(weights) == [1.0, 1.0, 1.0, 2.0, 2.0, 1.0]
    assert list(composite_weights(["linear_m1", "gelu_1"])) == [1.0, 1.0]


def test_a_memory_bound_kernel_larger_than_the_cores_caches_prices_its_bytes_as_spilled():
    from tfcompile.cost_models.cache_spill import kernel_spill_bytes

    small, large = (group_kernels(_mlp(rows), "ort")[1] for rows in (8, 4096))  # the GELUs: 4 KB and 2 MB
    cache = 1 << 20
    assert kernel_spill_bytes(small, "activation", cache) == 0.0
    assert kernel_spill_bytes(large, "activation", cache) == large.bytes_moved
    assert kernel_spill_bytes(large, "gemm", cache) == 0.0  # a GEMM's reuse is in its own rate
    assert kernel_spill_bytes(large, "activation", 0.0) == 0.0  # caches not known: nothing spills


def test_the_host_device_knows_its_cores_level_2_caches(tmp_path):
    from tfcompile.cost_models.device import cache_bytes_at_level, last_level_cache_bytes

    for index, (level, size) in enumerate((("1", "48K"), ("2", "2048K"), ("3", "105M"))):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(level + "\n")
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert cache_bytes_at_level(2, tmp_path) == 2 * 2**20
    assert last_level_cache_bytes(tmp_path) == 105 * 2**20
    assert cache_bytes_at_level(4, tmp_path) == 0.0


class _Sdpa(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_an_unfused_attention_spills_every_pass_over_scores_larger_than_the_cores_caches():
    from tfcompile.cost_models.cache_spill import core_cache_bytes, score_spill_bytes
    from tfcompile.cost_models.device import load_device

    cache, passes = core_cache_bytes("cpu"), load_device("cpu").attention_score_passes
    for seq in (16, 1024):
        graph = export_module(_Sdpa(), tuple(torch.randn(1, 4, seq, 8) for _ in range(3)), name=f"sdpa{seq}")
        score_bytes = 4 * seq * seq * 4
        spilled = passes * score_bytes if cache and score_bytes > cache else 0.0  # the host's own L2s decide
        assert score_spill_bytes(graph, "cpu", "ort") == score_spill_bytes(graph, "cpu", "tvm") == spilled
        assert score_spill_bytes(graph, "cpu", "torch") == 0.0  # fused: the scores never leave the chip


class _Chain(torch.nn.Module):
    def forward(self, x, y):
        for _ in range(3):
            x = torch.relu(x * y + y)
        return x


def test_tvm_fuses_an_elementwise_chain_that_reads_another_input_into_one_kernel():
    graph = export_module(_Chain(), (torch.randn(64, 32), torch.randn(64, 32)), name="chain3")
    (kernel,) = group_kernels(graph, "tvm")  # FuseOps: one loop over the chain, y read inside it
    assert kernel.op_class == "memory" and len(kernel.nodes) == 9
    assert kernel.bytes_written == 64 * 32 * 4  # the 8 intermediates never reach memory
    assert len(group_kernels(graph, "ort")) > 1  # the mul of two activations starts a kernel of its own there
