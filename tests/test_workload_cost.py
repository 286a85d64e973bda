"""Variants over a workload of several batches (``tfcompile.workload_cost`` through ``optimize_model``)."""

import json

import pytest

import tfcompile
from tests.tiny import TINY_OVERRIDES
from tfcompile.errors import InvalidOptionError, TfcompileError
from tfcompile.frontend import LoadOptions

TINY_BERT = LoadOptions(config_overrides=TINY_OVERRIDES["bert-base"])


def _report(outcome) -> dict:
    return json.loads(outcome.report_path.read_text())


def test_a_grid_of_shapes_is_priced_per_shape_and_ranked_by_the_expectation(tmp_path):
    outcome = tfcompile.optimize_model("bert-base", tmp_path / "out", passes=("fold_constants",),
                                       batch_sizes=[1, 2], seq_lens=[8, 32], load=TINY_BERT)
    report = _report(outcome)
    assert (report["settings"]["batch"], report["settings"]["seq"]) == (2, 32)  # traced at the largest
    scenarios = report["settings"]["workload"]["scenarios"]
    assert [(s["batch"], s["seq"]) for s in scenarios] == [(1, 8), (1, 32), (2, 8), (2, 32)]
    for variant in report["variants"]:
        per_shape = variant["scenario_ms"]
        assert len(per_shape) == 4
        assert variant["expected_ms"] == pytest.approx(sum(per_shape) / 4)
    baseline = next(v for v in report["variants"] if v["name"] == "baseline")["scenario_ms"]
    # More tokens cost more: each shape was traced and priced on its own.
    assert baseline[0] < baseline[1] < baseline[3] and baseline[0] < baseline[2] < baseline[3]
    ranked = [v["expected_ms"] for v in report["variants"] if v["eligible"]]
    assert ranked == sorted(ranked)


def test_a_length_distribution_measures_every_batch_and_refuses_lengths_specific_variants(tmp_path):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("3 6\n9 3\n16 1\n")
    outcome = tfcompile.optimize_model("bert-base", tmp_path / "out", passes=("remove_padding",),
                                       batch_sizes=[4], seq_lens=[16], lengths_file=lengths, load=TINY_BERT,
                                       measure=True, backend="torch", repeat=3)
    reports = {r.name: r for r in outcome.result.reports}
    packed = reports["custom:remove_padding"]
    assert not packed.eligible and "specialised to the traced batch's lengths" in packed.note
    baseline = reports["baseline"]
    assert len(baseline.scenario_measured_ms) == 4
    assert baseline.measured_ms == pytest.approx(sum(baseline.scenario_measured_ms) / 4)
    # The padded model's cost does not depend on how many tokens are valid; the packed one's does.
    assert len(set(baseline.scenario_ms)) == 1
    assert len(set(packed.scenario_ms)) > 1 and max(packed.scenario_ms) < baseline.scenario_ms[0]


def test_workload_options_that_contradict_each_other(tmp_path):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("4\n")
    with pytest.raises(InvalidOptionError, match="not both"):
        tfcompile.optimize_model("bert-base", tmp_path / "out", lengths=[4], lengths_file=lengths, load=TINY_BERT)
    with pytest.raises(InvalidOptionError, match="padded to: one value"):
        tfcompile.optimize_model("bert-base", tmp_path / "out", seq_lens=[8, 16], lengths_file=lengths,
                                 load=TINY_BERT)
    with pytest.raises(InvalidOptionError, match="--batch '8'"):
        tfcompile.optimize_model("bert-base", tmp_path / "out", batch_sizes="8", load=TINY_BERT)
    assert not (tmp_path / "out").exists()


def test_a_model_traced_at_one_shape_cannot_serve_a_grid(tmp_path):
    with pytest.raises(TfcompileError, match=r"traced at batch 1 and sequence 16 only: its source fixes the "
                                             r"input shape \(asked for batch 2"):
        tfcompile.optimize_model("tests.tiny:bert", tmp_path / "out", passes=("fold_constants",),
                                 batch_sizes=[1, 2])


def test_length_distributions_alone_change_the_chosen_variant(tmp_path):
    """Same model, batch and padded length; only the requests' lengths differ."""
    full, ragged = tmp_path / "full.txt", tmp_path / "ragged.txt"
    full.write_text("32\n")
    ragged.write_text("3 9\n32 1\n")  # most requests short, a few fill the row
    best = {}
    for name, lengths in (("full", full), ("ragged", ragged)):
        outcome = tfcompile.optimize_model("bert-base", tmp_path / name, batch_sizes=[4], seq_lens=[32],
                                           lengths_file=lengths, load=TINY_BERT)
        best[name] = next(r for r in outcome.result.reports if r.name == outcome.result.best)
        if name == "ragged":  # not searched: its variants would serve only the traced batch
            assert "the workload's batches have other lengths" in outcome.result.refusals["remove_padding"]
    assert "remove_padding_runtime" in best["ragged"].passes
    assert "remove_padding_runtime" not in best["full"].passes
    assert best["ragged"].expected_ms < best["full"].expected_ms


def test_the_packed_variant_is_exported_and_checked_at_its_valid_positions(tmp_path):
    """Per-token outputs of a packed variant are zeros at padding; model.onnx is checked where tokens are valid."""
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("3 6\n9 3\n")
    outcome = tfcompile.optimize_model("bert-base", tmp_path / "out", passes=("remove_padding_runtime",),
                                       batch_sizes=[4], seq_lens=[16], lengths_file=lengths, load=TINY_BERT)
    assert outcome.result.best == "custom:remove_padding_runtime"
    export = _report(outcome)["export"]
    assert export["max_rel_err"] <= 1e-4 and "remove_padding_runtime" in export["static_reason"]
