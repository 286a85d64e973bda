"""Greedy generation through the traced prefill/decode graphs equals Hugging Face ``generate``.

Tiny GPT-2 and Llama (tests.tiny's configs, seeded weights), a batch of three
prompts: equal lengths, and different lengths with left padding. The traced
graphs run in torch and, exported to ONNX, in ONNX Runtime (plain session runs
and the IO-bound loop of ``generation.measure``).

The tiny GPT-2 is built with ``initializer_range=0.2``: at GPT-2's default
0.02 the random model's hidden state is nearly its input embedding, and with
the tied head it repeats the last prompt token forever, which any cache (even
a wrong one) reproduces. A negative control checks that the comparison sees
the cache: zeroing the cache fed to each decode step changes the tokens.
"""

from __future__ import annotations

import onnx
import pytest
import torch

from tests.tiny import TINY_OVERRIDES
from tfcompile.backends.ort import OrtModel, export_onnx
from tfcompile.frontend import zoo
from tfcompile.generation.greedy import greedy_generate, hf_greedy, left_pad
from tfcompile.generation.measure import measure_generation
from tfcompile.generation.trace import trace_generation

NEW_TOKENS = 8
PROMPT_LEN = 10
MODELS = {"gpt2-small": {"initializer_range": 0.2}, "llama-tiny": {}}


def _prompts(lengths: tuple[int, ...], vocab: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(lengths))
    return left_pad([torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths])


EQUAL = (PROMPT_LEN, PROMPT_LEN, PROMPT_LEN)
RAGGED = (PROMPT_LEN, 6, 3)


@pytest.fixture(scope="module", params=list(MODELS))
def traced(request):
    name = request.param
    model = zoo.build(name, seed=0, config_overrides={**TINY_OVERRIDES[name], **MODELS[name]}).model
    graphs = trace_generation(model, batch=3, prompt_len=PROMPT_LEN, max_len=PROMPT_LEN + NEW_TOKENS - 1,
                              name=name)
    return name, model, graphs


@pytest.fixture(scope="module")
def exported(traced, tmp_path_factory):
    name, model, graphs = traced
    directory = tmp_path_factory.mktemp(f"gen-{name}")
    prefill = export_onnx(graphs.prefill, directory / "prefill.onnx", external_data=True)
    decode = export_onnx(graphs.decode, directory / "decode.onnx", external_data=True)
    return prefill, decode


@pytest.mark.parametrize("lengths", [EQUAL, RAGGED], ids=["equal", "left-padded"])
def test_torch_graphs_generate_hf_tokens(traced, lengths):
    _, model, graphs = traced
    ids, mask = _prompts(lengths)
    ours = greedy_generate(graphs.prefill.run, graphs.decode.run, graphs.cache, ids, mask, new_tokens=NEW_TOKENS)
    expected = hf_greedy(model, ids, mask, new_tokens=NEW_TOKENS)
    assert ours.shape == (3, NEW_TOKENS)
    assert torch.equal(ours, expected)


def test_zeroed_cache_changes_tokens(traced):
    """Negative control: the token comparison above would catch a decode step that ignores its cache."""
    _, model, graphs = traced
    ids, mask = _prompts(EQUAL)

    def forgetful(inputs):
        return graphs.decode.run(inputs[:4] + tuple(torch.zeros_like(t) for t in inputs[4:]))

    ours = greedy_generate(graphs.prefill.run, forgetful, graphs.cache, ids, mask, new_tokens=NEW_TOKENS)
    expected = hf_greedy(model, ids, mask, new_tokens=NEW_TOKENS)
    assert torch.equal(ours[:, 0], expected[:, 0])  # the prefill's token does not read the cache
    assert not torch.equal(ours, expected)


@pytest.mark.parametrize("lengths", [EQUAL, RAGGED], ids=["equal", "left-padded"])
def test_onnx_runtime_generates_hf_tokens(traced, exported, lengths):
    _, model, graphs = traced
    prefill_path, decode_path = exported
    ids, mask = _prompts(lengths)
    prefill, decode = OrtModel(prefill_path, threads=1), OrtModel(decode_path, threads=1)
    ours = greedy_generate(prefill.run, decode.run, graphs.cache, ids, mask, new_tokens=NEW_TOKENS)
    assert torch.equal(ours, hf_greedy(model, ids, mask, new_tokens=NEW_TOKENS))


def test_io_bound_measurement_generates_hf_tokens(traced, exported):
    _, model, graphs = traced
    ids, mask = _prompts(RAGGED)
    timing = measure_generation(*exported, graphs.cache, ids, mask, new_tokens=NEW_TOKENS, repeat=2, warmup=1,
                                threads=1)
    assert torch.equal(torch.from_numpy(timing.tokens), hf_greedy(model, ids, mask, new_tokens=NEW_TOKENS))
    assert timing.ttft_ms.runs == 2 and timing.tpot_ms.runs == 2 * (NEW_TOKENS - 1)
    assert 0 < timing.tpot_ms.low <= timing.tpot_ms.median and timing.ttft_ms.median > 0


def test_exported_decode_step_has_static_shapes(traced, exported):
    """The static cache: every input and output of the decode file has fixed dimensions, cache in == cache out."""
    _, _, graphs = traced
    model = onnx.load(str(exported[1]), load_external_data=False)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.input, *model.graph.output]}
    assert all(isinstance(d, int) and d > 0 for dims in shapes.values() for d in dims), shapes
    assert len(model.graph.input) == 4 + 2 * graphs.cache.layers
    for i in range(graphs.cache.layers):
        assert shapes[f"past_key_{i}"] == shapes[f"present_key_{i}"] == list(graphs.cache.shape)
    assert shapes["logits"] == [3, 512]


def test_cache_too_short_is_refused(traced):
    _, _, graphs = traced
    ids, mask = _prompts(EQUAL)
    with pytest.raises(ValueError, match="exceed"):
        greedy_generate(graphs.prefill.run, graphs.decode.run, graphs.cache, ids, mask, new_tokens=NEW_TOKENS + 1)
