"""Prepacked prefill (``generation.prepack``): the packing plan, the packed inputs, and exact greedy generation.

The exactness claim is end to end: the packed prefill followed by the
unchanged decode step (``generation.trace``) and greedy loop
(``generation.greedy``) generates the tokens Hugging Face ``generate`` does
on the left-padded batch, for tiny GPT-2 and Llama (seeded weights; GPT-2 at
``initializer_range=0.2``, see ``test_greedy``) and several mixes of prompt
lengths, in torch and in ONNX Runtime. A negative control shows the token
comparison sees the block-diagonal mask.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.tiny import TINY_OVERRIDES
from tfcompile.backends.ort import OrtModel, export_onnx
from tfcompile.frontend import zoo
from tfcompile.generation.greedy import greedy_generate, hf_greedy, left_pad
from tfcompile.generation.prepack import (PackingPlan, PrepackError, block_causal_mask, check_prepackable,
                                          first_fit_decreasing, packed_inputs, prefill_runner,
                                          trace_prepacked_prefill)
from tfcompile.generation.trace import DecodeStep, PrefillStep, cache_spec

NEW_TOKENS = 8
MODELS = {"gpt2-small": {"initializer_range": 0.2}, "llama-tiny": {}}
MIXES = {  # lengths, row capacity (None: the longest prompt)
    "three": ((10, 6, 3), None),
    "five-with-ones": ((7, 7, 2, 5, 1), None),
    "eight-long-tail": ((12, 1, 1, 4, 9, 3, 12, 2), None),
    "wide-rows": ((5, 3, 3, 2), 8),
}


def _prompts(lengths, vocab: int = 512) -> list[list[int]]:
    gen = torch.Generator().manual_seed(sum(lengths) + len(lengths))
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


# --- the plan --------------------------------------------------------------------------------------------

def _random_lengths(seed: int) -> tuple[list[int], int]:
    rng = random.Random(seed)
    capacity = rng.randint(1, 64)
    return [rng.randint(1, capacity) for _ in range(rng.randint(1, 40))], capacity


@pytest.mark.parametrize("seed", range(20))
def test_plan_places_every_prompt_once_and_fills_no_row_over_capacity(seed):
    lengths, capacity = _random_lengths(seed)
    plan = first_fit_decreasing(lengths, capacity)
    placed = sorted(p for row in plan.rows for p in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[p] for p in row) <= capacity for row in plan.rows)
    assert all(row for row in plan.rows)
    spans = {}
    for prompt, (row, offset) in enumerate(plan.placements()):  # prompts in a row do not overlap
        spans.setdefault(row, []).append((offset, offset + lengths[prompt]))
    for intervals in spans.values():
        intervals.sort()
        assert all(a[1] <= b[0] for a, b in zip(intervals, intervals[1:]))


@pytest.mark.parametrize("seed", range(20))
def test_plan_is_first_fit_decreasing(seed):
    """Replayed longest first: each prompt sits in the first row that had room for it when it came."""
    lengths, capacity = _random_lengths(seed)
    plan = first_fit_decreasing(lengths, capacity)
    row_of = {p: r for r, row in enumerate(plan.rows) for p in row}
    fill = [0] * len(plan.rows)
    opened = 0
    for prompt in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(opened) if fill[r] + lengths[prompt] <= capacity]
        expected = fits[0] if fits else opened
        assert row_of[prompt] == expected
        opened = max(opened, expected + 1)
        fill[expected] += lengths[prompt]
    assert [plan.rows[r] for r in range(len(plan.rows))] == \
        [tuple(p for p in sorted(row, key=lambda i: (-lengths[i], i))) for row in plan.rows]


def test_plan_of_a_known_batch():
    plan = first_fit_decreasing([5, 4, 3, 3, 2, 1], 6)
    assert plan.rows == ((0, 5), (1, 4), (2, 3))
    assert plan.placements() == [(0, 0), (1, 0), (2, 0), (2, 3), (1, 4), (0, 5)]
    counts = first_fit_decreasing([8, 2, 2, 2, 2]).token_counts()
    assert counts["rows"] == 2 and counts["padded_tokens"] == 40 and counts["packed_tokens"] == 16


@pytest.mark.parametrize("lengths, capacity, match", [([], None, "no prompts"), ([3, 0], None, "at least one"),
                                                      ([9, 2], 8, "does not fit")])
def test_plan_refuses_what_it_cannot_pack(lengths, capacity, match):
    with pytest.raises(ValueError, match=match):
        first_fit_decreasing(lengths, capacity)


# --- the packed inputs -----------------------------------------------------------------------------------

def test_packed_inputs_restart_positions_and_right_align_the_cache():
    plan = PackingPlan((3, 2, 1), 6, ((0, 1), (2,)))
    ids, positions, segments, last, cache_index = packed_inputs(plan, [[11, 12, 13], [21, 22], [31]])
    assert ids.tolist() == [[11, 12, 13, 21, 22, 0], [31, 0, 0, 0, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 0, 0, 0, 0]]
    assert segments.tolist() == [[0, 0, 0, 1, 1, -1], [2, -1, -1, -1, -1, -1]]
    assert last.tolist() == [2, 4, 6]
    assert cache_index.tolist() == [[0, 1, 2], [-1, 3, 4], [-1, -1, 6]]
    with pytest.raises(ValueError, match="not the plan's"):
        packed_inputs(plan, [[1, 2], [3, 4], [5]])


def test_block_causal_mask_keeps_each_prompt_to_itself():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]))[0, 0].int()
    assert mask.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


# --- exactness -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    name = request.param
    return name, zoo.build(name, seed=0, config_overrides={**TINY_OVERRIDES[name], **MODELS[name]}).model


def _eager(step: torch.nn.Module):
    """A runner over the untraced step module (what torch.export traces; ``test_greedy`` covers the tracing)."""
    def run(inputs):
        with torch.no_grad():
            return step(*inputs)
    return run


def _setup(model, mix):
    """The plan, the traced packed prefill, the cache spec and the left-padded batch of ``mix``."""
    name, module = model
    lengths, capacity = MIXES[mix]
    plan = first_fit_decreasing(lengths, capacity)
    spec = cache_spec(module, batch=plan.batch, max_len=plan.prompt_len + NEW_TOKENS - 1)
    packed = trace_prepacked_prefill(module, plan, max_len=spec.max_len, name=name)
    prompts = _prompts(lengths)
    return plan, packed, spec, prompts, left_pad(prompts)


@pytest.mark.parametrize("mix", list(MIXES))
def test_prepacked_prefill_generates_hf_tokens(model, mix):
    plan, packed, spec, prompts, (ids, mask) = _setup(model, mix)
    assert len(plan.rows) < plan.batch  # the mix really packs
    inputs = packed_inputs(plan, prompts)
    decode = _eager(DecodeStep(model[1], spec))
    ours = greedy_generate(prefill_runner(packed.run, inputs), decode, spec, ids, mask, new_tokens=NEW_TOKENS)
    assert torch.equal(ours, hf_greedy(model[1], ids, mask, new_tokens=NEW_TOKENS))
    # and the prefill itself: the padded prefill's logits, and its cache at every real token's slot
    packed_out, padded_out = packed.run(inputs), _eager(PrefillStep(model[1], spec))((ids, mask))
    torch.testing.assert_close(packed_out[0], padded_out[0], rtol=1e-5, atol=1e-5)
    real = torch.nn.functional.pad(mask, (0, spec.max_len - plan.prompt_len)).bool()[:, None, :, None]
    for ours_t, theirs in zip(packed_out[1:], padded_out[1:]):
        assert ours_t.shape == theirs.shape == spec.shape
        torch.testing.assert_close(ours_t * real, theirs * real, rtol=1e-5, atol=1e-5)
        assert not ours_t[~real.expand_as(ours_t)].any()  # zero at padding and after the prompt


def test_onnx_runtime_prepacked_prefill_generates_hf_tokens(model, tmp_path):
    """The packed prefill exported to ONNX and run in ONNX Runtime (the decode step's ONNX form is
    ``test_greedy``'s; here it runs in torch to keep the test short)."""
    plan, packed, spec, prompts, (ids, mask) = _setup(model, "five-with-ones")
    prefill = OrtModel(export_onnx(packed, tmp_path / "packed.onnx", external_data=True), threads=1)
    ours = greedy_generate(prefill_runner(prefill.run, packed_inputs(plan, prompts)),
                           _eager(DecodeStep(model[1], spec)), spec, ids, mask, new_tokens=NEW_TOKENS)
    assert torch.equal(ours, hf_greedy(model[1], ids, mask, new_tokens=NEW_TOKENS))


def test_one_segment_per_row_changes_tokens(model):
    """Negative control: with a plain causal mask over each row (prompts see their row-mates), the tokens differ."""
    plan, packed, spec, prompts, (ids, mask) = _setup(model, "three")
    input_ids, positions, segments, last, cache_index = packed_inputs(plan, prompts)
    leaky = (input_ids, positions, torch.where(segments >= 0, 0, -1), last, cache_index)
    ours = greedy_generate(prefill_runner(packed.run, leaky), _eager(DecodeStep(model[1], spec)), spec, ids, mask,
                           new_tokens=NEW_TOKENS)
    assert not torch.equal(ours, hf_greedy(model[1], ids, mask, new_tokens=NEW_TOKENS))


# --- refusals --------------------------------------------------------------------------------------------

def test_refuses_a_model_without_an_lm_head():
    bert = zoo.build("bert-base", seed=0, config_overrides=TINY_OVERRIDES["bert-base"]).model
    with pytest.raises(PrepackError, match="not a causal LM"):
        check_prepackable(bert)


def test_refuses_an_attention_that_ignores_a_boolean_mask():
    gpt2 = zoo.build("gpt2-small", seed=0, config_overrides=TINY_OVERRIDES["gpt2-small"]).model
    gpt2.config._attn_implementation = "flash_attention_2"
    with pytest.raises(PrepackError, match="4-D boolean mask"):
        check_prepackable(gpt2)


def test_refuses_a_model_that_mixes_tokens_outside_attention():
    """The probe: an embedding that adds the mean over the row's tokens mixes packed prompts."""
    gpt2 = zoo.build("gpt2-small", seed=0, config_overrides=TINY_OVERRIDES["gpt2-small"]).model
    gpt2.transformer.wte.register_forward_hook(lambda module, args, out: out + out.mean(dim=1, keepdim=True))
    with pytest.raises(PrepackError, match="tokens mix outside attention"):
        check_prepackable(gpt2)
    plan = first_fit_decreasing([3, 2])
    with pytest.raises(PrepackError):
        trace_prepacked_prefill(gpt2, plan, max_len=4)


def test_refuses_a_cache_shorter_than_the_prompts(model):
    with pytest.raises(ValueError, match="cannot hold"):
        trace_prepacked_prefill(model[1], first_fit_decreasing([6, 2]), max_len=5)
