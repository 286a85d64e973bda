"""prune_tokens (Zero-TPrune): applicability, exactness of the machinery, FLOPs, quality, padding, ORT."""

from __future__ import annotations

import dataclasses
import operator

import pytest
import torch

from tests.tiny import LowRankFfnBlock, load_tiny, tiny_module
from tfcompile import structure
from tfcompile.corpus import encode_sentences, english_sentences
from tfcompile.cost_models.op_costs import cost_of
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.graph import clone, export_module
from tfcompile.knob_search.token_schedule import batched, mean_cosine, outputs_on
from tfcompile.passes import apply_pass, get_pass
from tfcompile.passes.base import Exactness
from tfcompile.passes.tokens.prune import prune_graph

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
    """The pass applied (its plan and rewrite on a clone); returns the graph and the summary."""
    pruned, outcome = apply_pass(graph, "prune_tokens", **knobs)
    assert outcome.applied, outcome.reason
    return pruned, outcome.reason


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


@pytest.mark.slow  # full-size minilm on 32 sentences; twin: test_quality_figure_on_a_tiny_encoder
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


@pytest.mark.slow  # exports full-size minilm; twin: test_pruned_tiny_bert_runs_in_ort
def test_onnx_export_runs_in_ort_and_matches_torch(minilm, tmp_path):
    from tfcompile.backends.runner import lower

    pruned, _ = _prune(minilm, keep_ratio=0.6, layers=[1])
    lowered = lower(pruned, "ort", tmp_path)
    reference = pruned.run()[0]
    assert (torch.as_tensor(lowered.outputs[0]) - reference).abs().max().item() <= 1e-4


# -- merge=True (passes/tokens/merging.py): sizes, size-weighted pooling, proportional attention ---------------

MERGE = dict(merge=True, merge_attention=True, merge_states=True)


def _sizes(graph) -> list[torch.Tensor]:
    nodes = [n for n in graph.gm.graph.nodes if n.meta.get("token_merge") == "weights"]
    values = structure.evaluate_nodes(graph, nodes)
    return [values[n] for n in nodes]


def test_merge_keeping_every_token_is_exact(minilm):
    # Every token its own group of size 1 (0 for padding): the sizes, the pooling that reads them,
    # log-size attention bias (log 1 = 0) and the averaged states change nothing.
    graph = clone(minilm)
    prune_graph(graph, {0: 32, 2: 32}, **KNOBS, **MERGE)
    assert len(_sizes(graph)) == 2
    assert (graph.run(minilm.example_inputs)[0] - minilm.run()[0]).abs().max().item() <= 1e-5


def test_merge_sizes_count_the_real_tokens_across_cuts(minilm):
    lengths = minilm.example_inputs[1].sum(1)
    pruned, outcome = apply_pass(minilm, "prune_tokens", keep_ratio=[0.9, 0.5], layers=[0, 2], **MERGE)
    summary = outcome.reason
    assert "sizes weight the mean pooling" in summary
    counts = outcome.record.tokens[1:]
    for sizes, kept in zip(_sizes(pruned), counts):
        assert sizes.shape == (8, kept)
        assert torch.equal(sizes.sum(1), lengths.float())  # no mass lost, none from padding
        # Kept padding has size 0, every kept real token at least its own 1.
        assert torch.equal((sizes > 0).sum(1), lengths.clamp(max=kept))
        assert bool((sizes[sizes > 0] >= 1).all())


class _SumPooled(torch.nn.Module):
    """Post-LN encoder without positions and with a masked *sum* pooling: on one repeated token id
    every state is the same vector h, so the output is (number of real tokens)·h."""

    def __init__(self, d: int = 16, heads: int = 2, layers: int = 3):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.heads = heads
        self.embed = torch.nn.Embedding(20, d)
        self.q, self.k, self.v, self.o = (torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
                                          for _ in range(4))
        self.norm = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(layers))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, input_ids, attention_mask):
        b, n = input_ids.shape
        h = self.embed(input_ids)
        allowed = attention_mask.bool()[:, None, None, :].expand(b, 1, n, n)
        for q, k, v, o, norm in zip(self.q, self.k, self.v, self.o, self.norm):
            split = [lin(h).view(b, n, self.heads, -1).transpose(1, 2) for lin in (q, k, v)]
            a = torch.nn.functional.scaled_dot_product_attention(*split, attn_mask=allowed)
            h = norm(h + o(a.transpose(1, 2).reshape(b, n, -1)))
        return ((h * attention_mask.unsqueeze(-1).float()).sum(1),)


def test_merge_keeps_the_pooled_mass_on_identical_tokens():
    ids = torch.full((4, 12), 7)
    mask = (torch.arange(12) < torch.tensor([12, 9, 5, 3]).unsqueeze(1)).long()
    graph = export_module(_SumPooled(), (ids, mask), name="sum-pooled", input_names=["input_ids", "attention_mask"])
    reference = graph.run()[0]
    knobs = dict(keep_ratio=0.5, layers=[0, 1])
    merged, _ = _prune(graph, **knobs, **MERGE)
    assert torch.allclose(merged.run()[0], reference, rtol=1e-5, atol=1e-5)
    pooled_only, _ = _prune(graph, **knobs, merge=True, merge_attention=False, merge_states=False)
    assert torch.allclose(pooled_only.run()[0], reference, rtol=1e-5, atol=1e-5)
    # Without sizes the 12-token row sums 3 states, not 12.
    dropped, _ = _prune(graph, **knobs)
    assert not torch.allclose(dropped.run()[0], reference, rtol=1e-3, atol=1e-3)


@pytest.mark.slow  # full-size minilm on 32 sentences; twin: test_quality_figure_on_a_tiny_encoder
def test_merge_raises_quality_on_real_sentences(minilm, sentences):
    batches = batched(sentences, 8)
    reference = outputs_on(minilm, batches)
    quality = {}
    for merge in (False, True):
        pruned, _ = _prune(minilm, keep_ratio=[0.6, 0.6], layers=[0, 2], merge=merge)
        quality[merge] = mean_cosine(reference, outputs_on(pruned, batches))
    print("mean cosine without / with merge (after layers 0 and 2, 0.6 each):", quality)
    assert quality[True] >= quality[False] + 0.05


@pytest.mark.slow  # exports full-size minilm; twin: test_merged_tiny_encoder_runs_in_ort
def test_merge_onnx_export_runs_in_ort_and_matches_torch(minilm, sentences, tmp_path):
    from tfcompile.backends import ort  # what lower(graph, "ort", ...) runs, on one thread here
    from tfcompile.verify import compare_outputs

    pruned, _ = _prune(minilm, keep_ratio=[0.7, 0.7], layers=[0, 2], **MERGE)
    model = ort.OrtModel(ort.export_onnx(pruned, tmp_path / "merged.onnx"), threads=1, spinning=False)
    # The export's own rows and others (other kept sets, groups and sizes).
    for inputs in (pruned.example_inputs, batched(sentences, 8)[1]):
        got = tuple(torch.as_tensor(o) for o in model.run(inputs))
        assert compare_outputs(pruned.run(inputs), got).max_abs_err <= 1e-4


def test_merge_without_mean_pooling_applies_to_tiny_vit():
    # CLS output, no attention mask: the sizes only drive the attention bias and the averaged states.
    graph = load_tiny("vit-base")
    pruned, summary = _prune(graph, keep_ratio=0.5, layers=[0], merge=True)
    assert "no mean pooling found" in summary and "proportional attention" in summary
    assert pruned.run(graph.example_inputs)[0].shape == graph.run()[0].shape
    exact = clone(graph)
    prune_graph(exact, {0: 17}, **KNOBS, **MERGE)
    assert (exact.run(graph.example_inputs)[0] - graph.run()[0]).abs().max().item() <= 1e-5


# -- fast twins of the minilm tests marked slow -----------------------------------------------------


def _cls_bert():
    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    return export_module(_ClsBert(), (ids, torch.ones_like(ids)), name="bert-cls",
                         input_names=["input_ids", "attention_mask"])


def test_pruned_tiny_bert_runs_in_ort(tmp_path):
    """Fast twin of test_onnx_export_runs_in_ort_and_matches_torch: 2-layer, hidden-64 BERT."""
    from tfcompile.backends.runner import lower

    pruned, _ = _prune(_cls_bert(), keep_ratio=0.6, layers=[0])
    lowered = lower(pruned, "ort", tmp_path)
    reference = pruned.run()[0]
    assert (torch.as_tensor(lowered.outputs[0]) - reference).abs().max().item() <= 1e-4


def _sum_pooled(batch=4):
    ids = torch.randint(0, 20, (batch, 12), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(12) < torch.tensor([12, 9, 5, 3] * (batch // 4)).unsqueeze(1)).long()
    return export_module(_SumPooled(), (ids, mask), name="sum-pooled", input_names=["input_ids", "attention_mask"])


def test_merged_tiny_encoder_runs_in_ort(tmp_path):
    """Fast twin of test_merge_onnx_export_runs_in_ort_and_matches_torch, on the 3-layer toy encoder."""
    from tfcompile.backends import ort
    from tfcompile.verify import compare_outputs

    graph = _sum_pooled()
    pruned, _ = _prune(graph, keep_ratio=[0.7, 0.7], layers=[0, 1], **MERGE)
    model = ort.OrtModel(ort.export_onnx(pruned, tmp_path / "merged.onnx"), threads=1, spinning=False)
    ids = torch.randint(0, 20, (4, 12), generator=torch.Generator().manual_seed(2))
    other = (ids, (torch.arange(12) < torch.tensor([4, 12, 7, 10]).unsqueeze(1)).long())
    for inputs in (pruned.example_inputs, other):
        got = tuple(torch.as_tensor(o) for o in model.run(inputs))
        assert compare_outputs(pruned.run(inputs), got).max_abs_err <= 1e-4


def test_quality_figure_on_a_tiny_encoder():
    """Fast twin of the two quality tests on real sentences: the same figure, on the 3-layer toy encoder."""
    graph = _sum_pooled()
    ids = torch.randint(0, 20, (8, 12), generator=torch.Generator().manual_seed(3))
    batches = batched((ids, (torch.arange(12) < torch.tensor([12, 9, 5, 3] * 2).unsqueeze(1)).long()), 4)
    assert len(batches) == 2
    reference = outputs_on(graph, batches)
    assert mean_cosine(reference, reference) == pytest.approx(1.0)
    for merge in (False, True):
        pruned, _ = _prune(graph, keep_ratio=[0.6, 0.6], layers=[0, 1], merge=merge)
        quality = mean_cosine(reference, outputs_on(pruned, batches))
        assert -1 <= quality < 1
