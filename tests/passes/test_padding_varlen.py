"""remove_padding_varlen: one variable-length attention per layer, exact at any lengths, priced at Σ l²."""

import random

import pytest
import torch

from tfcompile.cost_models.fusion import group_kernels
from tfcompile.cost_models.model import cost_model_for
from tfcompile.cost_models.op_costs import cost_of
from tfcompile.passes import PassContext, Workload, apply_pass, get_pass, pass_order
from tfcompile.passes.base import Stage
from tfcompile.passes.padding import with_lengths
from tfcompile.structure.varlen import VARLEN_ATTENTION, varlen_attention
from tests.tiny import llama_with_mask, load_tiny

NAME = "remove_padding_varlen"
TOL = 1e-5


def _gpu_context(lengths=None):
    return PassContext(cost_model_for("h100", "torch"), Workload(lengths=tuple(lengths) if lengths else None))


def _block_diagonal(q, k, v, offsets, causal, scale):
    """One attention over all T tokens with a block-diagonal mask (what the op's ONNX form computes)."""
    positions = torch.arange(q.shape[0])
    sequence = (positions.unsqueeze(1) >= offsets[1:].unsqueeze(0)).sum(1)
    mask = sequence.unsqueeze(1) == sequence.unsqueeze(0)
    if causal:
        mask &= positions.unsqueeze(1) >= positions.unsqueeze(0)
    heads = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*heads, attn_mask=mask, scale=scale)
    return out.squeeze(0).transpose(0, 1)


@pytest.mark.parametrize("causal", [False, True])
def test_the_op_attends_within_each_sequence(causal):
    generator = torch.Generator().manual_seed(0)
    lengths = [7, 1, 12, 4]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v = (torch.randn(sum(lengths), 3, 8, generator=generator) for _ in range(3))
    got = varlen_attention(q, k, v, offsets, max(lengths), causal, 0.3)
    assert got.shape == q.shape
    assert (got - _block_diagonal(q, k, v, offsets, causal, 0.3)).abs().max() <= 1e-6
    # A token of the first sequence ignores every other sequence: changing them leaves it alone.
    k2 = k.clone()
    k2[7:] += 5.0
    assert torch.equal(varlen_attention(q, k2, v, offsets, 12, causal, 0.3)[:7], got[:7])


def test_registered_exact_after_the_other_padding_passes():
    pass_ = get_pass(NAME)
    assert pass_.exact and pass_.stage is Stage.PADDING
    order = pass_order()
    assert order.index("remove_padding_runtime") < order.index(NAME)


@pytest.mark.parametrize("target, backend", [("cpu", "ort"), ("cpu", "torch"), ("h100", "ort"), ("cpu", "tvm")])
def test_refused_where_no_runtime_has_the_kernel(target, backend):
    graph = with_lengths(load_tiny("bert-base", batch=4, seq=16), [16, 5, 9, 2])
    context = PassContext(cost_model_for(target, backend, calibrated=False), Workload())
    same, outcome = apply_pass(graph, NAME, context=context)
    assert not outcome.applied and "no variable-length attention kernel" in outcome.reason
    assert same is graph


def _valid(lengths, seq):
    return torch.arange(seq).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def _worst_error_at_new_lengths(graph, packed, trials, seed):
    batch, seq = graph.example_inputs[0].shape[:2]
    rng = random.Random(seed)
    worst = 0.0
    for _ in range(trials):
        lengths = [rng.randint(1, seq) for _ in range(batch)]
        padded = with_lengths(graph, lengths)
        valid = _valid(lengths, seq)
        for ref, out in zip(padded.run(), packed.run(padded.example_inputs)):
            if tuple(ref.shape[:2]) == (batch, seq):
                assert (out[~valid] == 0).all()
                ref, out = ref[valid], out[valid]
            worst = max(worst, ((ref - out).abs().max() / ref.abs().max()).item())
    return worst


def test_bert_is_exact_at_lengths_it_never_saw():
    graph = with_lengths(load_tiny("bert-base", batch=4, seq=16), [16, 5, 9, 2])
    packed, outcome = apply_pass(graph, NAME, context=_gpu_context())
    assert outcome.applied, outcome.reason
    assert sum(n.target is VARLEN_ATTENTION for n in packed.call_nodes()) == 2  # one per layer
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in packed.call_nodes())
    assert _worst_error_at_new_lengths(graph, packed, trials=4, seed=0) <= TOL


def test_causal_decoder_with_rope_and_grouped_query_attention():
    graph = with_lengths(llama_with_mask(3, 16), [16, 3, 9])
    packed, outcome = apply_pass(graph, NAME, context=_gpu_context())
    assert outcome.applied, outcome.reason
    assert set(outcome.record.patterns) == {"causal"}
    assert all(n.args[5] for n in packed.call_nodes() if n.target is VARLEN_ATTENTION)
    assert _worst_error_at_new_lengths(graph, packed, trials=3, seed=3) <= TOL


def test_priced_at_the_workloads_sum_of_squared_lengths_in_one_kernel():
    graph = with_lengths(load_tiny("bert-base", batch=4, seq=16), [16, 5, 9, 2])
    workload = [4, 8, 6, 2, 10, 6]  # mean 6 -> T = 24; mean of squares 42.67 -> Σl² = 170.7 over 4 rows
    varlen, outcome = apply_pass(graph, NAME, context=_gpu_context(workload))
    assert outcome.record.expected_tokens == 24
    assert outcome.record.expected_sum_sq_lengths == pytest.approx(4 * sum(n * n for n in workload) / 6)
    block, _ = apply_pass(graph, "remove_padding_runtime", context=_gpu_context(workload))

    def attention_flops(g, target):
        return sum(cost_of(n).flops for n in g.call_nodes() if n.target is target)

    ratio = attention_flops(block, torch.ops.aten.scaled_dot_product_attention.default) / attention_flops(
        varlen, VARLEN_ATTENTION)
    assert ratio == pytest.approx(24**2 / outcome.record.expected_sum_sq_lengths, rel=0.01)
    attention_kernels = [k for k in group_kernels(varlen, "torch") if k.op_class == "attention"]
    assert len(attention_kernels) == 2  # one launch per layer, whatever the number of sequences


def test_a_gpu_prices_the_per_length_loop_above_one_varlen_kernel():
    """Eight different lengths: remove_padding launches an attention per length; varlen launches one."""
    lengths = [448, 213, 404, 471, 231, 36, 148, 510]
    graph = with_lengths(load_tiny("bert-base", batch=8, seq=512), lengths)
    context = _gpu_context(lengths)
    latency_s = {}
    for name in ("remove_padding", "remove_padding_runtime", NAME):
        variant, outcome = apply_pass(graph, name, context=context)
        assert outcome.applied, outcome.reason
        latency_s[name] = context.cost_model.predict(variant).latency_s
    assert latency_s[NAME] < latency_s["remove_padding"]
    assert latency_s[NAME] < latency_s["remove_padding_runtime"]


def test_onnx_export_computes_the_block_diagonal_form_in_onnx_runtime(tmp_path):
    from tfcompile.backends.ort import OrtModel, export_onnx

    graph = with_lengths(load_tiny("bert-base", batch=4, seq=16), [16, 5, 9, 2])
    packed, _ = apply_pass(graph, NAME, context=_gpu_context())
    model = OrtModel(export_onnx(packed, tmp_path / "varlen.onnx"), threads=1)
    for lengths in ([3, 16, 1, 7], [16] * 4):
        padded = with_lengths(graph, lengths)
        valid = _valid(lengths, 16)
        got = [torch.from_numpy(o) for o in model.session.run(None, model.feeds(padded.example_inputs))]
        for ref, out in zip(padded.run(), got):
            assert ((ref[valid] - out[valid]).abs().max() / ref[valid].abs().max()).item() <= TOL



def test_remove_padding_with_varlen_attention_is_exact_and_one_kernel_per_layer():
    lengths = [16, 5, 9, 2]
    graph = with_lengths(load_tiny("bert-base", batch=4, seq=16), lengths)
    packed, outcome = apply_pass(graph, "remove_padding", context=_gpu_context(), attention="varlen")
    assert outcome.applied, outcome.reason
    assert "2 variable-length attention calls" in outcome.reason
    ops = [n for n in packed.call_nodes() if n.target is VARLEN_ATTENTION]
    assert len(ops) == 2 and all(n.meta["sum_sq_lengths"] == sum(n * n for n in lengths) for n in ops)
    valid = _valid(lengths, 16)
    for ref, out in zip(graph.run(), packed.run()):
        assert ((ref[valid] - out[valid]).abs().max() / ref[valid].abs().max()).item() <= TOL
    # Still specialised to its lengths: another batch gets NaN, not plausible rows.
    other = with_lengths(graph, [3, 16, 1, 7])
    assert all(out.isnan().all() for out in packed.run(other.example_inputs))
    per_length, _ = apply_pass(graph, "remove_padding", context=_gpu_context())
    predict = _gpu_context().cost_model.predict
    assert predict(packed).latency_s < predict(per_length).latency_s  # per layer: 4 lengths' launches against 1


def test_remove_padding_refuses_varlen_attention_without_the_kernel_and_unknown_forms():
    graph = with_lengths(load_tiny("bert-base", batch=4, seq=16), [16, 5, 9, 2])
    cpu = PassContext(cost_model_for("cpu", "ort", calibrated=False), Workload())
    _, outcome = apply_pass(graph, "remove_padding", context=cpu, attention="varlen")
    assert not outcome.applied and "no variable-length attention kernel" in outcome.reason
    _, outcome = apply_pass(graph, "remove_padding", context=_gpu_context(), attention="flash")
    assert not outcome.applied and "per_length, varlen" in outcome.reason
