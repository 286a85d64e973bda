import pytest
import torch

from tfcompile.verify import compare_outputs


def test_relative_error_is_against_the_largest_reference_magnitude():
    ref = (torch.tensor([[10.0, 0.0]]),)
    got = (torch.tensor([[10.0, 0.01]]),)
    check = compare_outputs(ref, got)
    assert check.max_abs_err == torch.tensor(0.01).item()
    assert abs(check.max_rel_err - 0.001) < 1e-9


def test_logits_quality_is_top1_agreement():
    ref = (torch.tensor([[[1.0, 2.0], [3.0, 0.0]]]),)
    got = (torch.tensor([[[1.0, 2.0], [0.0, 3.0]]]),)
    check = compare_outputs(ref, got, ["logits"])
    assert check.quality_metric == "top1_agreement" and check.quality == 0.5


def test_padded_positions_are_ignored_only_when_lengths_are_given():
    ref = torch.randn(2, 4, 3)
    got = ref.clone()
    got[0, 3] = 100.0  # row 0 has length 3: position 3 is padding
    assert compare_outputs((ref,), (got,)).max_abs_err > 50
    assert compare_outputs((ref,), (got,), lengths=[3, 4]).max_abs_err == 0
    got[1, 3] = 100.0  # row 1 is full length: this one counts
    assert compare_outputs((ref,), (got,), lengths=[3, 4]).max_abs_err > 50


def test_mean_cosine_over_a_padded_batch_counts_only_valid_positions():
    ref = torch.randn(2, 8, 16)
    got = ref.clone()
    got[0, 2:] = 0.0  # a packed variant: zeros where row 0 is padding
    check = compare_outputs((ref,), (got,), ["last_hidden_state"], lengths=[2, 8])
    assert check.quality_metric == "mean_cosine" and check.quality == pytest.approx(1.0)
    got[1, 0] = -ref[1, 0]  # one valid position pointing the other way
    # 10 valid positions (2 + 8), one of them at cosine -1: (9 - 1) / 10.
    assert compare_outputs((ref,), (got,), ["last_hidden_state"], lengths=[2, 8]).quality == pytest.approx(0.8)
