"""merge_tokens (ToMe bipartite matching between attention and FFN): exactness on duplicates,
FLOPs, quality on real sentences, refusals, ONNX Runtime."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.tiny import load_tiny
from tfcompile.corpus import encode_sentences, english_sentences
from tfcompile.cost_models import estimate, load_device
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.graph import clone, export_module
from tfcompile.knob_search.token_schedule import batched, mean_cosine, outputs_on
from tfcompile.passes import apply_pass, get_pass
from tfcompile.passes.base import Exactness


class _MeanPooledEncoder(torch.nn.Module):
    """Post-LN encoder with an FFN, no positions, masked mean pooling: equal ids have equal states."""

    def __init__(self, d: int = 24, heads: int = 2, layers: int = 3):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.heads = heads
        self.embed = torch.nn.Embedding(40, d)
        self.q, self.k, self.v, self.o = (torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
                                          for _ in range(4))
        self.up = torch.nn.ModuleList(torch.nn.Linear(d, 2 * d) for _ in range(layers))
        self.down = torch.nn.ModuleList(torch.nn.Linear(2 * d, d) for _ in range(layers))
        self.norm1 = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(layers))
        self.norm2 = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(layers))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, input_ids, attention_mask):
        b, n = input_ids.shape
        h = self.embed(input_ids)
        allowed = attention_mask.bool()[:, None, None, :].expand(b, 1, n, n)
        for i in range(len(self.q)):
            split = [lin(h).view(b, n, self.heads, -1).transpose(1, 2) for lin in (self.q[i], self.k[i], self.v[i])]
            a = torch.nn.functional.scaled_dot_product_attention(*split, attn_mask=allowed)
            h = self.norm1[i](h + self.o[i](a.transpose(1, 2).reshape(b, n, -1)))
            h = self.norm2[i](h + self.down[i](torch.nn.functional.gelu(self.up[i](h))))
        weights = attention_mask.unsqueeze(-1).float()
        return ((h * weights).sum(1) / weights.sum(1),)


def _duplicates_graph():
    # CLS, then each odd position's id repeated at the next (even) one: every A token has a twin in B.
    row = [1] + [t for k in range(2, 9) for t in (k, k)] + [30]
    ids = torch.tensor([row, [1] + [t for k in range(10, 17) for t in (k, k)] + [31]])
    mask = torch.ones_like(ids)
    return export_module(_MeanPooledEncoder(), (ids, mask), name="duplicates",
                         input_names=["input_ids", "attention_mask"])


@pytest.fixture(scope="module")
def minilm():
    graph = load_model("minilm", LoadOptions(batch=8, seq=32))
    return dataclasses.replace(graph, example_inputs=encode_sentences(english_sentences(8, offset=40), 32))


def test_registered_as_approximate():
    assert get_pass("merge_tokens").exactness is Exactness.APPROXIMATE


def test_merging_exact_twins_is_exact():
    # A merged pair of equal states, weighted 2 in attention (log 2) and in the pooling, is what
    # the two tokens were: the output does not change, though every layer runs on fewer tokens.
    graph = _duplicates_graph()
    merged, outcome = apply_pass(graph, "merge_tokens", r=5, layers=[0])
    assert outcome.applied, outcome.reason
    assert "16 → 11" in outcome.reason and "sizes weight the mean pooling" in outcome.reason
    assert torch.allclose(merged.run()[0], graph.run()[0], rtol=1e-5, atol=1e-5)
    # Without the sizes (proportional attention off) the same cut changes the function.
    unweighted, _ = apply_pass(graph, "merge_tokens", r=5, layers=[0], merge_attention=False)
    assert not torch.allclose(unweighted.run()[0], graph.run()[0], rtol=1e-3, atol=1e-3)


@pytest.mark.slow  # full-size minilm on 32 sentences; twin: test_merging_every_layer_of_a_tiny_encoder
def test_flops_fall_and_quality_stays_high_on_real_sentences(minilm):
    sentences = encode_sentences(english_sentences(32, offset=100), 32)
    batches = batched(sentences, 8)
    reference = outputs_on(minilm, batches)
    device = load_device("cpu")
    merged, outcome = apply_pass(minilm, "merge_tokens", r=3)
    assert outcome.applied, outcome.reason
    assert list(outcome.record.tokens) == [32, 29, 26, 23, 20, 17, 14]
    cut = 1 - estimate(merged, device).flops / estimate(minilm, device).flops
    quality = mean_cosine(reference, outputs_on(merged, batches))
    print(f"merge_tokens r=3 on 32 padded sentences: FLOPs cut {cut:.1%}, mean cosine {quality:.4f}")
    # Padding goes first, then near-duplicate real tokens: 0.987 measured at a 29 % cut.
    assert cut > 0.25 and quality > 0.98


def test_refusals_name_the_reason(minilm):
    reason = get_pass("merge_tokens").check(load_tiny("gpt2-small"))
    assert reason is not None and "causal" in reason
    _, outcome = apply_pass(load_tiny("bert-base"), "merge_tokens", r=2)
    assert not outcome.applied and "indexed by token" in outcome.reason
    _, outcome = apply_pass(minilm, "merge_tokens", r=16, layers=[0])
    assert not outcome.applied and "can merge 1..15 of 32" in outcome.reason
    _, outcome = apply_pass(minilm, "merge_tokens", r=0)
    assert not outcome.applied and "nothing to merge" in outcome.reason


@pytest.mark.slow  # exports full-size minilm merged at six layers; twin: test_merging_every_layer_of_a_tiny_encoder
def test_onnx_export_runs_in_ort_and_matches_torch(minilm, tmp_path):
    from tfcompile.backends import ort

    merged, outcome = apply_pass(minilm, "merge_tokens", r=[4, 4, 4, 4, 4, 4])
    assert outcome.applied
    model = ort.OrtModel(ort.export_onnx(merged, tmp_path / "merged.onnx"), threads=1, spinning=False)
    other = encode_sentences(english_sentences(8, offset=300), 32)
    for inputs in (merged.example_inputs, other):
        got = torch.as_tensor(model.run(inputs)[0])
        assert (got - merged.run(inputs)[0]).abs().max().item() <= 1e-4
    assert clone(merged).run(other)[0].shape == minilm.run(other)[0].shape


def test_merging_every_layer_of_a_tiny_encoder(tmp_path):
    """Fast twin of the two minilm tests above: FLOPs, the quality figure and ONNX Runtime, on the 3-layer toy."""
    from tfcompile.backends import ort

    graph = _duplicates_graph()
    merged, outcome = apply_pass(graph, "merge_tokens", r=2)
    assert outcome.applied, outcome.reason
    assert list(outcome.record.tokens) == [16, 14, 12, 10]
    device = load_device("cpu")
    assert estimate(merged, device).flops < estimate(graph, device).flops
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 40, (4, 16), generator=gen)
    ids[:, 0] = 1
    other = (ids, torch.ones_like(ids))
    batches = batched((torch.cat([graph.example_inputs[0], ids[:2]]), torch.ones(4, 16, dtype=torch.int64)), 2)
    quality = mean_cosine(outputs_on(graph, batches), outputs_on(merged, batches))
    assert 0 < quality <= 1
    model = ort.OrtModel(ort.export_onnx(merged, tmp_path / "merged.onnx"), threads=1, spinning=False)
    for inputs in (merged.example_inputs, tuple(t[:2] for t in other)):
        got = torch.as_tensor(model.run(inputs)[0])
        assert (got - merged.run(inputs)[0]).abs().max().item() <= 1e-4
