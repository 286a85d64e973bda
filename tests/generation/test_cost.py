"""Predicted TTFT and TPOT: the decode step is weight-streaming bound, the prefill compute bound (cpu roofline)."""

from __future__ import annotations

import pytest

from tfcompile.cost_models.model import cost_model_for
from tfcompile.frontend import zoo
from tfcompile.generation.cost import predict_generation, weight_streaming_bound_s
from tfcompile.generation.trace import trace_generation

PROMPT_LEN, NEW_TOKENS = 128, 8


def _gpt2(width: int):
    overrides = dict(n_layer=2, n_embd=width, n_head=4, vocab_size=4096, n_positions=PROMPT_LEN + NEW_TOKENS)
    model = zoo.build("gpt2-small", seed=0, config_overrides=overrides).model
    return trace_generation(model, batch=1, prompt_len=PROMPT_LEN, max_len=PROMPT_LEN + NEW_TOKENS - 1)


@pytest.fixture(scope="module")
def predictions():
    cost_model = cost_model_for("cpu", "ort", calibrated=False)
    return cost_model, {width: predict_generation(_gpt2(width), cost_model, new_tokens=NEW_TOKENS)
                        for width in (256, 512)}


def test_decode_time_follows_weight_bytes(predictions):
    cost_model, by_width = predictions
    small, large = by_width[256], by_width[512]
    assert large.weight_bytes > 3 * small.weight_bytes
    assert large.tpot_s > 2 * small.tpot_s  # grows with the bytes (less than 3x: per-kernel overhead is fixed)
    device = cost_model.device
    streaming = weight_streaming_bound_s(large.weight_bytes + large.cache_bytes,
                                         device.mem_bandwidth_bytes_per_s * device.efficiency["memory"])
    assert large.tpot_s == pytest.approx(streaming, rel=0.25)
    assert large.tpot_s > weight_streaming_bound_s(large.weight_bytes, device.mem_bandwidth_bytes_per_s)


def test_phases_sit_on_opposite_sides_of_the_roofline(predictions):
    _, by_width = predictions
    prediction = by_width[512]
    assert prediction.bound("prefill") == "compute"
    assert prediction.bound("decode") == "memory"
    assert prediction.intensity("decode") < prediction.ridge_flops_per_byte < prediction.intensity("prefill")
    # A 128-token prefill costs far less than 128 decode steps: its weights are read once, not per token.
    assert prediction.ttft_s < PROMPT_LEN * prediction.tpot_s / 4
    assert prediction.generation_s == pytest.approx(prediction.ttft_s + (NEW_TOKENS - 1) * prediction.tpot_s)


def test_bound_rejects_nonpositive_bandwidth():
    with pytest.raises(ValueError):
        weight_streaming_bound_s(1e9, 0)
