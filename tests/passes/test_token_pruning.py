"""prune_tokens (Zero-TPrune): applicability, exactness of the machinery, FLOPs, quality, padding, ORT."""

from __future__ import annotations

import dataclasses
import operator

import pytest
import torch

from tests.tiny import LowRankFfnBlock, load_tiny, tiny_module
from tfcompile.corpus import encode_sentences, english_sentences
from tfcompile.cost_models.op_costs import cost_of
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.graph import clone, export_module
from tfcompile.passes import apply_pass, get_pass, structure
from tfcompile.passes.base import Exactness
from tfcompile.passes.token_pruning import prune_graph
from tfcompile.passes.token_pruning_schedule import batched, mean_cosine, outputs_on

aten = torch.ops.aten
KNOBS = dict(iterations=None, head_range=(0.01, 0.7), sim_fraction=0.5, cls_weight="sqrt")


@pytest.fixture(scope="module")
def minilm():
    """minilm at batch 8 × seq 32 on real, right-padded sentences."""
    graph = load_model("minilm", LoadOptions(batch=8, seq=32))
    return dataclasses.replace(graph, example_inputs=encode_sentences(english_sentences(8, offset=40), 32))


@pytest.fixture(scope="module")
def sentences():
    """32 real sentences (4 batches of 8) for the quality figure (the benchmark uses 256)."""
    return encode_sentences(english_sentences(32, offset=100), 32)


def _prune(graph, **knobs):
    """The pass's run without apply_pass's check, which repeats a dry run (tests here are about run)."""
    result = get_pass("prune_tokens").run(clone(graph), **knobs)
    assert result.changed, result.summary
    return result.graph, result.summary


def _linear_flops(graph) -> float:
    return sum(cost_of(n).flops for n in graph.call_nodes() if n.target is aten.linear.default)


def _keep_indices(graph) -> list[torch.Tensor]:
    picks = [n for n in graph.call_nodes() if n.target is operator.getitem and n.args[1] == 1
             and n.args[0].target is aten.topk.default]
    values = structure.evaluate_nodes(graph, picks)
    return [values[p] for p in picks]


def test_registered_as_approximate():
    assert get_pass("prune_tokens").exactness is Exactness.APPROXIMATE


def test_keep_ratio_one_leaves_the_graph_alone(minilm):
    rewritten, outcome = apply_pass(minilm, "prune_tokens", keep_ratio=1.0)
    assert not outcome.applied and "nothing to prune" in outcome.reason
    assert torch.equal(rewritten.run(minilm.example_inputs)[0], minilm.run()[0])


def test_keeping_every_token_is_exact(minilm):
    # The whole machinery (explicit attention, ranking, gathers of hidden state, mask and
    # pooling mask, reshapes after the cut) with K = N only reorders tokens: same function.
    graph = clone(minilm)
    prune_graph(graph, {0: 32, 2: 32}, **KNOBS)
    assert any(n.target is aten.topk.default for n in graph.call_nodes())
    reference = minilm.run()[0]
    assert (graph.run(minilm.example_inputs)[0] - reference).abs().max().item() <= 1e-5


def test_flops_follow_the_kept_tokens(minilm):
    nodes_before = [(n.name, n.target) for n in minilm.gm.graph.nodes]
    pruned, outcome = apply_pass(minilm, "prune_tokens", keep_ratio=0.5, layers=[0])
    assert outcome.applied, outcome.reason
    assert "32 → 16" in outcome.reason
    assert [(n.name, n.target) for n in minilm.gm.graph.nodes] == nodes_before  # input untouched
    # Every linear after layer 0 sees 16 of 32 tokens: 1/6 of the linear FLOPs at full size,
    # 5/6 at half size.
    before, after = _linear_flops(minilm), _linear_flops(pruned)
    assert after == pytest.approx(before * (1 / 6 + 5 / 6 * 0.5), rel=1e-9)
    assert pruned.run(minilm.example_inputs)[0].shape == minilm.run()[0].shape


def test_quality_on_real_sentences_falls_with_the_keep_ratio(minilm, sentences):
    batches = batched(sentences, 8)
    assert len(batches) == 4
    reference = outputs_on(minilm, batches)
    quality = {}
    for keep in (0.9, 0.4):
        pruned, _ = _prune(minilm, keep_ratio=keep, layers=[1])
        quality[keep] = mean_cosine(reference, outputs_on(pruned, batches))
    print("mean cosine by keep ratio (after layer 1, 32 sentences, seq 32):", quality)
    assert quality[0.9] >= 0.98
    assert quality[0.4] < quality[0.9] - 0.02


def test_padding_goes_first_and_cls_stays(minilm):
    lengths = minilm.example_inputs[1].sum(1)
    longest = int(lengths.max())
    assert longest < 32, "the fixture batch must be padded"
    pruned, _ = _prune(minilm, keep_ratio=longest / 32, layers=[0])
    # Only padding went: the embeddings are those of the unpruned model.
    got, reference = pruned.run(minilm.example_inputs)[0], minilm.run()[0]
    assert (got - reference).abs().max().item() <= 1e-5
    (kept,) = _keep_indices(pruned)
    assert bool((kept[:, 0] == 0).all())  # CLS first
    for row, length in enumerate(lengths.tolist()):
        assert sorted(kept[row].tolist())[:length] == list(range(length))  # every real token kept
    # Tighter than the shortest row: still CLS, and no padded token while real ones are dropped.
    pruned, _ = _prune(minilm, keep_ratio=0.25, layers=[0])
    (kept,) = _keep_indices(pruned)
    assert bool((kept[:, 0] == 0).all())
    assert bool((kept < lengths.unsqueeze(1)).all())


class _ClsBert(torch.nn.Module):
    """Tiny BERT with a CLS-pooled output (a classifier's input)."""

    def __init__(self):
        super().__init__()
        self.bert = tiny_module("bert-base")

    def forward(self, input_ids, attention_mask):
        return (self.bert(input_ids, attention_mask)[0][:, 0],)


def test_applies_to_tiny_bert_with_cls_output_and_refuses_token_outputs():
    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    graph = export_module(_ClsBert(), (ids, mask), name="bert-cls", input_names=["input_ids", "attention_mask"])
    pruned, outcome = apply_pass(graph, "prune_tokens", keep_ratio=0.5, layers=[0])
    assert outcome.applied, outcome.reason
    assert pruned.run(graph.example_inputs)[0].shape == (2, 64)
    _, outcome = apply_pass(load_tiny("bert-base"), "prune_tokens")
    assert not outcome.applied and "indexed by token" in outcome.reason


def test_applies_to_tiny_vit():
    graph = load_tiny("vit-base")
    pruned, outcome = apply_pass(graph, "prune_tokens", keep_ratio=0.5, layers=[0])
    assert outcome.applied, outcome.reason
    assert "17 → 9" in outcome.reason
    assert pruned.run(graph.example_inputs)[0].shape == graph.run()[0].shape


def test_refuses_decoder_and_attention_free_models():
    reason = get_pass("prune_tokens").check(load_tiny("gpt2-small"))
    assert reason is not None and "causal" in reason
    block = export_module(LowRankFfnBlock(d=32, hidden=64, rank=8), (torch.randn(2, 8, 32),), name="ffn")
    reason = get_pass("prune_tokens").check(block)
    assert reason is not None and "no scaled_dot_product_attention" in reason


def test_refuses_bad_knobs(minilm):
    _, outcome = apply_pass(minilm, "prune_tokens", keep_ratio=0.5, layers=[5])
    assert not outcome.applied and "cannot be pruned" in outcome.reason


def test_onnx_export_runs_in_ort_and_matches_torch(minilm, tmp_path):
    from tfcompile.backends.runner import lower

    pruned, _ = _prune(minilm, keep_ratio=0.6, layers=[1])
    lowered = lower(pruned, "ort", tmp_path)
    reference = pruned.run()[0]
    assert (torch.as_tensor(lowered.outputs[0]) - reference).abs().max().item() <= 1e-4
