import dataclasses
import random

import pytest
import torch

from tfcompile.cost_models import estimate, load_device
from tfcompile.cost_models.op_costs import cost_of
from tfcompile.cost_models.padding_gain import ideal_speedup, prepack_speedup
from tfcompile.errors import ShapeError
from tfcompile.graph import export_module, fetch_attr
from tfcompile.passes import PassContext, Workload, apply_pass, default_context, get_pass
from tfcompile.passes.padding import with_lengths
from tests.tiny import load_tiny

aten = torch.ops.aten
TOL = 1e-5


@pytest.fixture(scope="module")
def zoo():
    cache = {}

    def get(name, batch, seq):
        key = (name, batch, seq)
        if key not in cache:
            cache[key] = load_tiny(name, batch=batch, seq=seq)
        return cache[key]

    return get


def _lengths(lengths):
    """A context whose workload is a batch of ``lengths`` (the host roofline, as by default)."""
    return PassContext(default_context().cost_model, Workload(lengths=tuple(lengths)))


def _valid(lengths, seq):
    return torch.arange(seq).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def _rel_err(ref, got):
    return ((ref.double() - got.double()).abs().max() / ref.double().abs().max()).item()


def _check_packed(graph, lengths, pass_name="remove_padding", **knobs):
    """Apply the pass; valid outputs must match the padded model and padded ones be zero.

    Returns the packed graph and the pass's record."""
    before = [(n.name, n.target) for n in graph.gm.graph.nodes]
    reference = graph.run()
    packed, outcome = apply_pass(graph, pass_name, context=_lengths(lengths), **knobs)
    assert outcome.applied, outcome.reason
    assert get_pass(pass_name).exact
    got = packed.run(graph.example_inputs)
    assert [(n.name, n.target) for n in graph.gm.graph.nodes] == before  # input untouched
    errors = []
    seq = graph.example_inputs[0].shape[1]
    valid = _valid(lengths, seq)
    for ref, out in zip(reference, got):
        assert ref.shape == out.shape
        if tuple(ref.shape[:2]) == (len(lengths), seq):
            errors.append(_rel_err(ref[valid], out[valid]))
            assert (out[~valid] == 0).all()
        else:
            errors.append(_rel_err(ref, out))
    assert max(errors) <= TOL, f"{pass_name} relative error {max(errors):.2e}"
    return packed, outcome.record


def _random_lengths(rng, batch, seq):
    lengths = [rng.randint(1, seq) for _ in range(batch)]
    lengths[rng.randrange(batch)] = seq  # one full row, as a right-padded batch has
    return lengths


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bert_random_mixes_are_exact(zoo, seed):
    lengths = _random_lengths(random.Random(seed), 4, 16)
    graph = with_lengths(zoo("bert-base", 4, 16), lengths)
    _check_packed(graph, lengths)


@pytest.mark.parametrize("seed", [0, 1])
def test_minilm_mean_pooling_is_exact(zoo, seed):
    # Real weights; the sentence embedding pools over each sequence's packed tokens.
    lengths = _random_lengths(random.Random(10 + seed), 3, 32)
    graph = with_lengths(zoo("minilm", 3, 32), lengths)
    packed, _ = _check_packed(graph, lengths)
    sums = [n for n in packed.call_nodes() if n.target is aten.sum.dim_IntList]
    assert sums and all(tuple(n.meta["val"].shape) == (384,) for n in sums if n.args[1] == [0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gpt2_prefill_random_mixes_are_exact(zoo, seed):
    lengths = _random_lengths(random.Random(20 + seed), 4, 16)
    graph = with_lengths(zoo("gpt2-small", 4, 16), lengths)  # GPT-2 has no mask: lengths come from the workload
    _check_packed(graph, lengths)


def test_llama_rope_and_gqa_are_exact(zoo):
    lengths = [3, 16, 7, 1]
    graph = with_lengths(zoo("llama-tiny", 4, 16), lengths)
    _check_packed(graph, lengths)
    _check_packed(graph, lengths, "prepack")


@pytest.mark.parametrize("lengths", [[7], [9, 9, 9], [1, 16, 1], [16, 1]], ids=["one", "equal", "ones", "one-token"])
def test_edge_cases_are_exact(zoo, lengths):
    graph = with_lengths(zoo("bert-base", len(lengths), 16), lengths)
    packed, _ = _check_packed(graph, lengths)
    attention = [n for n in packed.call_nodes() if n.target is aten.scaled_dot_product_attention.default]
    assert len(attention) == 2 * len(set(lengths))  # one call per distinct length and layer


def test_gpt2_edge_cases(zoo):
    for lengths in ([5], [3, 3], [1, 16]):
        _check_packed(with_lengths(zoo("gpt2-small", len(lengths), 16), lengths), lengths)


def test_empty_row_and_too_long_rows_are_shape_errors(zoo):
    gpt2 = zoo("gpt2-small", 2, 16)
    with pytest.raises(ShapeError, match="row 1 is empty"):
        apply_pass(gpt2, "remove_padding", context=_lengths([4, 0]))
    with pytest.raises(ShapeError, match="length 17, more than the padded length 16"):
        apply_pass(gpt2, "remove_padding", context=_lengths([17, 4]))
    with pytest.raises(ShapeError, match="2 lengths given for a batch of 3"):
        apply_pass(zoo("gpt2-small", 3, 16), "remove_padding", context=_lengths([4, 5]))
    bert = zoo("bert-base", 2, 16)
    inputs = list(bert.example_inputs)
    inputs[1] = torch.tensor([[1] * 16, [0] * 16])
    with pytest.raises(ShapeError, match="row 1 is empty"):
        apply_pass(dataclasses.replace(bert, example_inputs=tuple(inputs)), "remove_padding")
    with pytest.raises(ShapeError, match="disagree with the example attention mask"):
        apply_pass(with_lengths(bert, [16, 5]), "remove_padding", context=_lengths([16, 6]))


def test_no_padding_leaves_the_graph_alone(zoo):
    graph = zoo("bert-base", 2, 16)  # all-ones example mask
    same, outcome = apply_pass(graph, "remove_padding")
    assert not outcome.applied and "no padding" in outcome.reason


class _Toy(torch.nn.Module):
    """Embedding + linear, then an op that mixes tokens (or a masked pooling that does not)."""

    def __init__(self, mix):
        super().__init__()
        self.mix = mix
        self.emb = torch.nn.Embedding(50, 16)
        self.fc = torch.nn.Linear(16, 16)
        self.conv = torch.nn.Conv1d(16, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(16)

    def forward(self, ids, mask):
        h = self.fc(self.emb(ids))
        if self.mix == "conv":
            h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        elif self.mix == "batchnorm":
            h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        elif self.mix == "mean":
            return (h.mean(dim=1),)
        elif self.mix == "unmasked-sum":
            return (h.sum(dim=1),)
        elif self.mix == "masked-mean":
            return ((h * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(1, keepdim=True),)
        elif self.mix == "masked-sum-channels-first":
            return ((h.transpose(1, 2) * mask.unsqueeze(1)).sum(dim=2),)
        elif self.mix == "mask-on-wrong-axis":
            return ((h * mask[:, :1, None]).sum(dim=1),)  # zeroes nothing at padded positions
        elif self.mix == "cls":
            return (h[:, 0],)
        elif self.mix == "last":
            return (h[:, -1],)
        return (h,)


def _toy(mix, lengths=(3, 8, 5)):
    ids = torch.randint(0, 50, (len(lengths), 8), generator=torch.Generator().manual_seed(0))
    graph = export_module(_Toy(mix).eval(), (ids, torch.ones(len(lengths), 8)), name=mix,
                          input_names=["input_ids", "attention_mask"])
    return with_lengths(graph, list(lengths))


@pytest.mark.parametrize("mix, reason", [
    ("conv", "sequence convolution mixes neighbouring tokens"),
    ("batchnorm", "BatchNorm mixes statistics across tokens"),
    ("mean", "pools over the sequence including padded positions"),
    ("unmasked-sum", "padded positions are not masked to zero"),
    ("last", "reads position 7, which is padding in some rows"),
    ("mask-on-wrong-axis", "padded positions are not masked to zero"),
])
def test_token_mixing_is_refused_with_reason(mix, reason):
    graph = _toy(mix)
    same, outcome = apply_pass(graph, "remove_padding")
    assert not outcome.applied and same is graph
    assert reason in outcome.reason


@pytest.mark.parametrize("mix", ["masked-mean", "masked-sum-channels-first", "cls"])
def test_per_sequence_pooling_is_exact(mix):
    _check_packed(_toy(mix), [3, 8, 5])


def test_left_padding_and_models_without_tokens_are_refused(zoo):
    graph = with_lengths(zoo("bert-base", 2, 8), [8, 8])
    inputs = list(graph.example_inputs)
    inputs[1] = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    graph.example_inputs = tuple(inputs)
    _, outcome = apply_pass(graph, "remove_padding")
    assert not outcome.applied and "not right-padded" in outcome.reason
    _, outcome = apply_pass(load_tiny("vit-base"), "remove_padding")
    assert not outcome.applied and "no integer [batch, sequence] token input" in outcome.reason


def test_encoder_without_mask_is_refused():
    # No mask: padded keys would be attended, so valid outputs depend on padding.
    class NoMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)

        def forward(self, ids):
            h = self.emb(ids).unsqueeze(1)
            return (torch.nn.functional.scaled_dot_product_attention(h, h, h).squeeze(1),)

    graph = export_module(NoMask(), (torch.randint(0, 50, (2, 8)),), name="nomask", input_names=["input_ids"])
    _, outcome = apply_pass(graph, "remove_padding", context=_lengths([3, 8]))
    assert not outcome.applied and "attend to padded positions" in outcome.reason


def test_wrong_positions_are_caught(zoo):
    # Negative control: positions that do not restart per sequence must fail the same check.
    lengths = [5, 16, 9]
    graph = with_lengths(zoo("gpt2-small", 3, 16), lengths)
    packed, _ = apply_pass(graph, "remove_padding", context=_lengths(lengths))
    positions = fetch_attr(packed.gm, "packing_slot_position")
    # Positions that run on across sequences (modulo the table) instead of restarting.
    packed.gm.packing_slot_position = torch.arange(len(positions)) % 16
    valid = _valid(lengths, 16)
    assert _rel_err(graph.run()[0][valid], packed.run()[0][valid]) > TOL


def _flops(graph, targets):
    return sum(cost_of(n).flops for n in graph.call_nodes() if n.target in targets)


GEMMS = {aten.linear.default, aten.addmm.default, aten.mm.default}
SDPA = {aten.scaled_dot_product_attention.default}


@pytest.mark.parametrize("name", ["bert-base", "gpt2-small"])
def test_packed_graph_computes_less(zoo, name):
    lengths = [3, 16, 7, 2]
    batch, seq = len(lengths), 16
    graph = with_lengths(zoo(name, batch, seq), lengths)
    packed, _ = apply_pass(graph, "remove_padding", context=_lengths(lengths))
    ideal = ideal_speedup(lengths, seq)
    assert ideal.token_wise == pytest.approx(64 / 28) and ideal.attention == pytest.approx(4 * 256 / 318)
    # Token-wise GEMMs scale exactly with Σl / (B·L).
    assert _flops(graph, GEMMS) / _flops(packed, GEMMS) == pytest.approx(ideal.token_wise)
    attention = _flops(graph, SDPA) / _flops(packed, SDPA)
    if name == "bert-base":
        assert attention == pytest.approx(ideal.attention)
    else:
        # The packed GPT-2 attends with is_causal, which the formula prices at half the scores.
        assert attention == pytest.approx(2 * ideal.attention)
    # The roofline prices the rewritten shapes: the same ratios per kernel class. Its latency
    # ratio is smaller, since per-kernel overhead dominates at this tiny size and packing adds kernels.
    device = load_device("cpu")
    before, after = estimate(graph, device), estimate(packed, device)

    def by_class(est, op_class):
        return sum(k.flops for k in est.kernels if k.op_class == op_class)

    assert by_class(before, "gemm") / by_class(after, "gemm") == pytest.approx(ideal.token_wise)
    assert by_class(before, "attention") / by_class(after, "attention") == pytest.approx(
        ideal.attention * (1 if name == "bert-base" else 2))
    assert 1 < before.latency_s / after.latency_s < ideal.token_wise


def test_gpt2_prepack_is_exact_and_uses_fewer_slots(zoo):
    lengths = [5, 16, 9, 3, 2, 7]
    graph = with_lengths(zoo("gpt2-small", 6, 16), lengths)
    packed, record = _check_packed(graph, lengths, "prepack")
    rows = record.rows
    assert rows == 3  # first-fit decreasing: 16 | 9+7 | 5+3+2
    masks = [n for n in packed.call_nodes() if n.target is aten.scaled_dot_product_attention.default]
    assert len(masks) == 2 and all(tuple(n.args[0].meta["val"].shape[:1]) == (rows,) for n in masks)
    ideal = prepack_speedup(lengths, 16, rows, 16)
    assert _flops(graph, GEMMS) / _flops(packed, GEMMS) == pytest.approx(ideal.token_wise)
    assert _flops(graph, SDPA) / _flops(packed, SDPA) == pytest.approx(ideal.attention)


def test_prepack_capacity_knob(zoo):
    lengths = [5, 12, 9, 3]
    graph = with_lengths(zoo("gpt2-small", 4, 16), lengths)
    _, record = _check_packed(graph, lengths, "prepack", capacity=16)  # 12+3 | 9+5
    assert record.rows == 2
    with pytest.raises(ShapeError, match="capacity 8 is shorter than the longest sequence"):
        apply_pass(graph, "prepack", context=_lengths(lengths), capacity=8)
    _, outcome = apply_pass(graph, "prepack", context=_lengths([16, 16, 16, 16]))
    assert not outcome.applied and "no gain" in outcome.reason


def test_prepack_bert_full_blocks(zoo):
    lengths = [4, 16, 6, 5]
    _check_packed(with_lengths(zoo("bert-base", 4, 16), lengths), lengths, "prepack")


def test_ideal_speedup_rejects_bad_lengths():
    assert ideal_speedup([8, 8], 8).token_wise == 1.0
    with pytest.raises(ShapeError):
        ideal_speedup([0, 4], 8)


@pytest.mark.parametrize("name", ["remove_padding", "prepack"])
def test_a_lengths_specialised_variant_poisons_its_outputs_for_other_lengths(name, tmp_path):
    """Issue 23: fed a batch of other lengths, the packed graph (and its ONNX file) answers NaN, not wrong rows."""
    import numpy as np
    import onnxruntime

    from tfcompile.backends.ort import export_onnx
    from tfcompile.frontend import LoadOptions, load_model
    from tfcompile.frontend.zoo import TINY_CONFIGS
    from tfcompile.passes import PassContext
    from tfcompile.passes.padding import with_lengths

    graph = with_lengths(load_model("bert-base", LoadOptions(config_overrides=TINY_CONFIGS["bert-base"], batch=3,
                                                             seq=16)), [5, 16, 9])
    variant, outcome = apply_pass(graph, name, PassContext.build("cpu", "ort", calibrated=False))
    assert outcome.applied, outcome.reason
    assert all(torch.isfinite(t).all() for t in variant.run())
    other = list(graph.example_inputs)
    other[graph.input_names.index("attention_mask")] = torch.ones_like(other[1])
    assert all(torch.isnan(t).all() for t in variant.run(tuple(other)))
    session = onnxruntime.InferenceSession(str(export_onnx(variant, tmp_path / "v.onnx")),
                                           providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert all(np.isnan(out).all() for out in session.run(None, {n: t.numpy() for n, t in zip(names, other)}))
    assert all(np.isfinite(out).all() for out in
               session.run(None, {n: t.numpy() for n, t in zip(names, graph.example_inputs)}))
