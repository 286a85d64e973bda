"""remove_padding_runtime: one graph serves any right-padded batch; valid outputs equal the padded model's."""

import random

import pytest
import torch

from tfcompile.cost_models.op_costs import cost_of
from tfcompile.errors import ShapeError
from tfcompile.graph import export_module
from tfcompile.passes import PassContext, Workload, apply_pass, default_context, get_pass, pass_order
from tfcompile.passes.base import Stage
from tfcompile.passes.padding import with_lengths
from tests.tiny import MeanPooledBert, llama_with_mask, load_tiny

aten = torch.ops.aten
TOL = 1e-5
NAME = "remove_padding_runtime"


@pytest.fixture(scope="module")
def zoo():
    cache = {}

    def get(name, batch, seq):
        if (name, batch, seq) not in cache:
            cache[name, batch, seq] = load_tiny(name, batch=batch, seq=seq)
        return cache[name, batch, seq]

    return get


def _context(lengths):
    return PassContext(default_context().cost_model, Workload(lengths=tuple(lengths)))


def _valid(lengths, seq):
    return torch.arange(seq).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def _rel_err(ref, got):
    return ((ref.double() - got.double()).abs().max() / ref.double().abs().max()).item()


def _errors(reference, got, lengths, seq):
    """Relative error at valid positions (token-indexed outputs must be zero at padded ones) or overall."""
    valid = _valid(lengths, seq)
    errors = []
    for ref, out in zip(reference, got):
        assert ref.shape == out.shape
        if tuple(ref.shape[:2]) == (len(lengths), seq):
            assert (out[~valid] == 0).all()
            errors.append(_rel_err(ref[valid], out[valid]))
        else:
            errors.append(_rel_err(ref, out))
    return errors


def _random_lengths(rng, batch, seq):
    return [rng.randint(1, seq) for _ in range(batch)]


def _batches_at_new_lengths(graph, trials, seed):
    """``trials`` seeded (lengths, graph fed a batch padded to them) at the graph's traced shape."""
    batch, seq = graph.example_inputs[0].shape[:2]
    rng = random.Random(seed)
    for _ in range(trials):
        lengths = _random_lengths(rng, batch, seq)
        yield lengths, with_lengths(graph, lengths)


def _check_new_lengths(graph, trials, seed=0, context=None):
    """Apply the pass once, then feed batches of other lengths: valid outputs must match the padded model."""
    before = [(n.name, n.target) for n in graph.gm.graph.nodes]
    packed, outcome = apply_pass(graph, NAME, context=context)
    assert outcome.applied, outcome.reason
    assert [(n.name, n.target) for n in graph.gm.graph.nodes] == before
    seq = graph.example_inputs[0].shape[1]
    worst = 0.0
    for lengths, batch_graph in _batches_at_new_lengths(graph, trials, seed):
        errors = _errors(batch_graph.run(), packed.run(batch_graph.example_inputs), lengths, seq)
        assert max(errors) <= TOL, f"lengths {lengths}: relative error {max(errors):.2e}"
        worst = max(worst, *errors)
    return packed, outcome.record, worst


def test_registered_exact_in_the_padding_stage():
    pass_ = get_pass(NAME)
    assert pass_.exact and pass_.stage is Stage.PADDING
    order = pass_order()
    assert order.index("remove_padding") < order.index("prepack") < order.index(NAME)


@pytest.mark.parametrize("seed", [0, 1])
def test_bert_serves_batches_of_other_lengths(zoo, seed):
    graph = with_lengths(zoo("bert-base", 4, 16), [16, 5, 9, 2])
    _, record, _ = _check_new_lengths(graph, trials=4, seed=seed)
    assert record.patterns == ("full", "full") and record.expected_tokens == 32


def test_minilm_like_mean_pooling_serves_other_lengths():
    # tests.tiny's minilm-shaped encoder: each sentence embedding sums its own packed tokens (one-hot product).
    ids = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    graph = export_module(MeanPooledBert().eval(), (ids, torch.ones_like(ids)), name="mean-pooled-bert",
                          input_names=MeanPooledBert.input_names)
    packed, _, _ = _check_new_lengths(with_lengths(graph, [32, 5, 11]), trials=3, seed=7)
    assert any(n.target is aten.mm.default for n in packed.call_nodes())


@pytest.mark.slow
def test_minilm_serves_other_lengths(zoo):
    _check_new_lengths(with_lengths(zoo("minilm", 4, 64), [64, 5, 11, 30]), trials=3, seed=8)


def test_causal_decoder_with_mask_rope_and_gqa():
    graph = with_lengths(llama_with_mask(3, 16), [16, 3, 9])
    packed, record, _ = _check_new_lengths(graph, trials=3, seed=3)
    assert set(record.patterns) == {"causal"}


class _Encoder(torch.nn.Module):
    """Token and position embeddings, one masked self-attention layer, then a read-out."""

    def __init__(self, readout="hidden", causal=False, fixed_keys=None):
        super().__init__()
        self.readout, self.causal = readout, causal
        self.emb = torch.nn.Embedding(50, 16)
        self.pos = torch.nn.Embedding(8, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 16)
        # A key mask frozen at trace time (not read from the input): right for one batch only.
        self.fixed_keys = fixed_keys

    def forward(self, ids, attention_mask):
        batch, seq = ids.shape
        h = self.emb(ids) + self.pos(torch.arange(seq))
        q, k, v = self.qkv(h).reshape(batch, seq, 3, 2, 8).permute(2, 0, 3, 1, 4)
        keys = attention_mask if self.fixed_keys is None else self.fixed_keys
        keep = keys[:, None, None, :].bool().expand(batch, 1, seq, seq)
        if self.causal:
            keep = keep & torch.ones(seq, seq, dtype=torch.bool).tril()
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        h = h + self.out(att.transpose(1, 2).reshape(batch, seq, 16))
        if self.readout == "cls":
            return (h[:, 0],)
        if self.readout == "second":
            return (h[:, 1],)
        if self.readout == "mean":
            weights = attention_mask.unsqueeze(-1).float()
            return ((h * weights).sum(1) / weights.sum(1), h)
        return (h,)


def _encoder(lengths=(3, 8, 5), **kwargs):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (len(lengths), 8), generator=torch.Generator().manual_seed(0))
    graph = export_module(_Encoder(**kwargs).eval(), (ids, torch.ones(len(lengths), 8, dtype=torch.int64)),
                          name="encoder", input_names=["input_ids", "attention_mask"])
    return with_lengths(graph, list(lengths))


@pytest.mark.parametrize("readout", ["hidden", "cls", "mean"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_read_outs_and_patterns_are_exact(readout, causal):
    _check_new_lengths(_encoder(readout=readout, causal=causal), trials=5)


def test_the_padded_positions_of_the_input_are_never_read():
    # Garbage ids and a mask value of 7 ("not zero") at valid positions give the same valid outputs.
    graph = _encoder()
    packed, _ = apply_pass(graph, NAME)
    ids, mask = graph.example_inputs
    noisy_ids = torch.where(mask.bool(), ids, torch.randint(0, 50, ids.shape))
    reference = graph.run()
    got = packed.run((noisy_ids, mask * 7))
    assert max(_errors(reference, got, [3, 8, 5], 8)) <= TOL


def test_models_it_cannot_serve_are_refused(zoo):
    cases = {
        "no attention mask input": (zoo("gpt2-small", 2, 16), _context([3, 16])),
        "not right-padded": (_left_padded(), None),
        "reads position 1": (_encoder(readout="second"), None),
        "no integer [batch, sequence] token input": (load_tiny("vit-base"), None),
    }
    for reason, (graph, context) in cases.items():
        same, outcome = apply_pass(graph, NAME, context=context)
        assert not outcome.applied and same is graph
        assert reason in outcome.reason, outcome.reason


def _left_padded():
    graph = _encoder()
    ids, _ = graph.example_inputs
    graph.example_inputs = (ids, torch.tensor([[1] * 8, [0, 0] + [1] * 6, [1] * 8]))
    return graph


def test_a_mask_fixed_at_trace_time_is_detected():
    # Right for the traced lengths (remove_padding accepts it), wrong for any other batch.
    lengths = [3, 8, 5]
    fixed = _valid(lengths, 8).to(torch.int64)
    graph = _encoder(lengths, fixed_keys=fixed)
    _, outcome = apply_pass(graph, "remove_padding", context=_context(lengths))
    assert outcome.applied
    _, outcome = apply_pass(graph, NAME)
    assert not outcome.applied and "neither full nor causal" in outcome.reason


def test_no_padding_and_packed_graphs_are_refused(zoo):
    bert = zoo("bert-base", 2, 16)  # all-ones example mask, no workload: nothing to price
    _, outcome = apply_pass(bert, NAME)
    assert not outcome.applied and "no padding to price" in outcome.reason
    packed, _ = apply_pass(with_lengths(bert, [16, 4]), "remove_padding")
    _, outcome = apply_pass(packed, NAME)
    assert not outcome.applied and "already removed" in outcome.reason
    with pytest.raises(ShapeError, match="outside 1..16"):
        apply_pass(bert, NAME, context=_context([4, 17]))


def _flops(graph, target):
    return sum(cost_of(n).flops for n in graph.call_nodes() if n.target is target)


def test_the_cost_model_sees_the_expected_token_count(zoo):
    graph = with_lengths(zoo("bert-base", 4, 16), [16, 5, 9, 2])
    # The workload's lengths are a sample of the traffic (any count): mean 6 tokens -> T = 24.
    packed, outcome = apply_pass(graph, NAME, context=_context([4, 8, 6, 2, 10, 6]))
    record = outcome.record
    assert (record.expected_tokens, record.source) == (24, "workload")
    attention = [n for n in packed.call_nodes() if n.target is aten.scaled_dot_product_attention.default]
    assert all(tuple(n.args[0].meta["val"].shape) == (1, 4, 24, 16) for n in attention)
    # Token-wise GEMMs scale with T / (B·L); attention prices T² scores against B·L².
    assert _flops(graph, aten.linear.default) / _flops(packed, aten.linear.default) == pytest.approx(64 / 24)
    sdpa = aten.scaled_dot_product_attention.default
    assert _flops(graph, sdpa) / _flops(packed, sdpa) == pytest.approx(4 * 16**2 / 24**2)
    # Without a workload: the example mask's count.
    _, outcome = apply_pass(graph, NAME)
    assert (outcome.record.expected_tokens, outcome.record.source) == (32, "example mask")
    # Dense given lengths are priced, not refused: one product over B·L tokens costs B× the padded attention.
    dense, outcome = apply_pass(graph, NAME, context=_context([16] * 4))
    assert outcome.record.expected_tokens == 64
    assert _flops(dense, sdpa) == pytest.approx(4 * _flops(graph, sdpa))


def _onnx_matches_at_new_lengths(graph, tmp_path, trials, seed=0):
    from tfcompile.backends.ort import OrtModel, export_onnx

    packed, _ = apply_pass(graph, NAME)
    path = export_onnx(packed, tmp_path / "runtime.onnx")
    model = OrtModel(path, threads=1)
    seq = graph.example_inputs[0].shape[1]
    worst = 0.0
    for lengths, batch_graph in _batches_at_new_lengths(graph, trials, seed):
        got = [torch.from_numpy(o) for o in model.session.run(None, model.feeds(batch_graph.example_inputs))]
        worst = max(worst, *_errors(batch_graph.run(), got, lengths, seq))
    assert worst <= TOL
    return worst


def test_onnx_export_serves_new_lengths_in_onnx_runtime(tmp_path):
    _onnx_matches_at_new_lengths(_encoder(readout="mean", causal=True), tmp_path, trials=4)


@pytest.mark.slow
@pytest.mark.parametrize("name, batch, seq", [("bert-base", 4, 16), ("minilm", 4, 64)])
def test_zoo_onnx_export_serves_new_lengths(zoo, tmp_path, name, batch, seq):
    lengths = [seq] + [max(1, seq // (b + 2)) for b in range(batch - 1)]
    _onnx_matches_at_new_lengths(with_lengths(zoo(name, batch, seq), lengths), tmp_path, trials=3)
