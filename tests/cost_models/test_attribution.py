"""A prediction split per group of ops adds up to the prediction, and each kernel lands in its group."""

import pytest
import torch

from tests.cost_models.test_score_tensors import HEAD, HEADS, TOKENS, WrittenOut
from tests.tiny import load_tiny
from tfcompile.cost_models import load_device
from tfcompile.cost_models.attribution import GROUPS, furthest_off, predicted_ms_by_group
from tfcompile.cost_models.calibration import CLASSES, Profile
from tfcompile.cost_models.model import CalibratedCostModel, RooflineCostModel
from tfcompile.graph import export_module


def _profile(backend: str) -> Profile:
    """Every coefficient non-zero and different, so a term counted twice or left out shows in the sum."""
    return Profile(target="cpu", backend=backend,
                   s_per_flop={c: (i + 1) * 1e-12 for i, c in enumerate(CLASSES)},
                   s_per_byte={c: (i + 1) * 3e-11 for i, c in enumerate(CLASSES)},
                   kernel_overhead_s=2e-6, graph_overhead_s=5e-5, view_overhead_s=1e-6)


@pytest.mark.parametrize("backend", ["ort", "tvm", "torch"])
@pytest.mark.parametrize("name", ["bert-base", "llama-tiny", "gpt2-small"])
def test_the_groups_of_a_calibrated_prediction_add_up_to_it(name, backend):
    graph = load_tiny(name, batch=1, seq=32)
    model = CalibratedCostModel(load_device("cpu"), backend, _profile(backend))
    split = predicted_ms_by_group(graph, model)
    assert list(split) == list(GROUPS)
    assert sum(split.values()) == pytest.approx(model.predict(graph).latency_s * 1e3, rel=1e-9)
    assert split["weight matmuls"] > 0 and split["attention"] > 0 and split["other ops"] > 0
    assert split["between kernels"] == pytest.approx(5e-2)


def test_the_groups_of_a_roofline_prediction_add_up_to_it():
    graph = load_tiny("bert-base", batch=1, seq=32)
    model = RooflineCostModel(load_device("cpu"), "ort")
    split = predicted_ms_by_group(graph, model)
    assert sum(split.values()) == pytest.approx(model.predict(graph).latency_s * 1e3, rel=1e-9)
    assert split["weight matmuls"] > 0 and split["attention"] > 0 and split["norms"] > 0


def test_an_attention_written_out_op_by_op_is_all_attention_on_ort():
    inputs = tuple(torch.randn(1, HEADS, TOKENS, HEAD) for _ in range(3)) + (torch.randn(1, 1, TOKENS, TOKENS),)
    graph = export_module(WrittenOut(), inputs, name="written")
    model = CalibratedCostModel(load_device("cpu"), "ort", _profile("ort"))
    split = predicted_ms_by_group(graph, model)
    # Matmuls, scale, bias, softmax and the sum over the probabilities: nothing left for other groups.
    assert split["attention"] > 0
    assert split["weight matmuls"] == split["norms"] == split["activations"] == 0
    assert sum(split.values()) == pytest.approx(model.predict(graph).latency_s * 1e3, rel=1e-9)


def test_furthest_off_is_the_group_with_the_largest_gap_and_its_sign():
    predicted = dict.fromkeys(GROUPS, 1.0) | {"attention": 5.0, "norms": 0.5}
    measured = dict.fromkeys(GROUPS, 1.0) | {"attention": 4.0, "norms": 3.0}
    assert furthest_off(predicted, measured) == ("norms", -2.5)
