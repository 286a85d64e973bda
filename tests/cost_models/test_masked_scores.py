import pytest
import torch
import torch.nn.functional as F

from tfcompile.micro_models import BandMaskAttention, BooleanMaskAttention, CausalAttention, OpenMaskAttention
from tfcompile.cost_models.calibration import Profile
from tfcompile.cost_models.masked_scores import hidden_fraction, masked_score_bytes
from tfcompile.cost_models.score_passes import score_pass_bytes
from tfcompile.graph import export_module

HEADS, TOKENS, HEAD = 2, 32, 8
SCORE_BYTES = HEADS * TOKENS * TOKENS * 4


def _qkv(batch=1):
    torch.manual_seed(0)
    return tuple(torch.randn(batch, HEADS, TOKENS, HEAD) for _ in range(3))


def _graph(module, inputs=None):
    return export_module(module, inputs or _qkv(), name=type(module).__name__)


class IsCausal(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class PaddingMask(torch.nn.Module):
    """A padding mask built from the input's own attention mask, as an encoder given a padded batch builds it."""

    def forward(self, q, k, v, attention_mask):
        keep = attention_mask.bool()[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


class LearnedMask(torch.nn.Module):
    """A mask computed by a linear layer: too costly to evaluate for a prediction, so counted as hiding none."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(HEAD, TOKENS)

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.proj(q) > 0)


class MaskedFill(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("hide", torch.ones(TOKENS, TOKENS, dtype=torch.bool).triu(1)[None, None])

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill(self.hide, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v)


def test_hidden_fraction_of_boolean_and_additive_masks():
    assert hidden_fraction(torch.tensor([True, False, False, True])) == 0.5
    assert hidden_fraction(torch.tensor([0.0, float("-inf"), torch.finfo(torch.float32).min, -5.0])) == 0.5


@pytest.mark.parametrize("module, hidden", [
    (CausalAttention(TOKENS), (TOKENS - 1) / (2 * TOKENS)),
    (BooleanMaskAttention(TOKENS), (TOKENS - 1) / (2 * TOKENS)),
    (IsCausal(), (TOKENS - 1) / (2 * TOKENS)),
    (BandMaskAttention(TOKENS, 4), 1 - (TOKENS * 9 - 2 * (4 + 3 + 2 + 1)) / TOKENS ** 2),
    (OpenMaskAttention(TOKENS), 0.0),
    (MaskedFill(), (TOKENS - 1) / (2 * TOKENS)),
])
def test_the_scores_a_mask_hides_are_counted_from_the_graph(module, hidden):
    assert masked_score_bytes(_graph(module)) == pytest.approx(hidden * SCORE_BYTES)


def test_a_padding_mask_is_read_from_the_examples_lengths():
    lengths = (TOKENS, TOKENS // 4)
    attention_mask = torch.zeros(2, TOKENS, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    graph = _graph(PaddingMask(), (*_qkv(batch=2), attention_mask))
    hidden_keys = sum(TOKENS - length for length in lengths) / (2 * TOKENS)
    assert masked_score_bytes(graph) == pytest.approx(hidden_keys * 2 * SCORE_BYTES)


def test_a_mask_made_by_a_gemm_is_not_evaluated_and_hides_none():
    assert masked_score_bytes(_graph(LearnedMask())) == 0.0


def test_hidden_scores_are_their_own_kind_on_backends_that_run_attention_unfused():
    band = _graph(BandMaskAttention(TOKENS, 4))
    assert score_pass_bytes(band, "ort")["score_masked"] == masked_score_bytes(band)
    assert score_pass_bytes(band, "torch") == {}
    rates = {"scores": 0.0, "score_mask": 0.0, "score_guard": 0.0, "score_masked": 1e-9}
    profile = Profile("cpu", "ort", s_per_flop={}, s_per_byte=rates, kernel_overhead_s=0.0, graph_overhead_s=0.0)
    assert profile.predict_s(band) == pytest.approx(1e-9 * masked_score_bytes(band))
    assert profile.predict_s(_graph(OpenMaskAttention(TOKENS))) == 0.0
