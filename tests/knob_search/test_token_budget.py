"""Budget-driven token schedules: calibration/held-out splits, the schedule search, and optimize's rule."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import load_tiny
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.knob_search.quality_data import QualitySplits
from tfcompile.knob_search.token_budget import Z, merge_schedule, within_budget
from tfcompile.passes import PassContext, apply_pass
from tfcompile.search import SearchSettings, budget_knob_grid, default_knob_grid

CONTEXT = PassContext.build("cpu", "ort", calibrated=False)


def _rows(count: int, seq: int, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 512, (count, seq), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(seq) < torch.tensor(lengths).repeat(count // len(lengths) + 1)[:count, None]).long()
    return ids * mask, mask


def _splits(graph, calibration, heldout) -> QualitySplits:
    batch = graph.example_inputs[0].shape[0]
    cut = lambda rows: [tuple(t[i:i + batch] for t in rows) for i in range(0, rows[0].shape[0], batch)]  # noqa: E731
    splits = QualitySplits(cut(calibration), cut(heldout), "test rows", list(graph.output_names))
    splits.reference_for(graph)
    return splits


@pytest.fixture(scope="module")
def encoder():
    """The 2-layer, hidden-64 mean-pooled BERT (random weights) at batch 4 × 32 tokens."""
    return load_model("tests.tiny:mean_pooled_bert", LoadOptions(batch=4, seq=32))


@pytest.fixture(scope="module")
def splits(encoder):
    return _splits(encoder, _rows(16, 32, [32, 28, 24, 30], 1), _rows(16, 32, [32, 26, 31, 29], 2))


def test_text_splits_only_for_real_text_models(encoder):
    assert QualitySplits.for_graph(encoder) is None  # random ids: no text to calibrate on
    assert QualitySplits.for_graph(load_tiny("gpt2-small", batch=1, seq=16)) is None


@pytest.fixture(scope="module")
def driven(encoder, splits):
    """The search settings the budget drove, and the schedule searches behind them (5 trials each).
    Random weights barely notice merging (r = 4 per layer: cosine 0.99978, r = 6: 0.99957), hence the budget."""
    settings = SearchSettings(allow_approx=True, knob_grid=default_knob_grid())
    return budget_knob_grid(encoder, splits, 0.9996, CONTEXT, settings, max_trials=5)


def test_merge_schedule_is_the_largest_cut_within_budget(encoder, splits, driven):
    schedule = driven[1]["merge_tokens"]
    assert schedule.knobs is not None, [t.as_dict() for t in schedule.trials]
    assert schedule.flops_cut > 0 and within_budget(schedule.calibration, 0.9996)
    assert schedule.calibration.quality - Z * schedule.calibration.stderr >= 0.9996
    tried = [t for t in schedule.trials if t.calibration is not None]
    assert len(schedule.trials) <= 5 and any(not t.accepted for t in tried)  # it pushed past the budget
    for trial in tried:
        assert trial.accepted == within_budget(trial.calibration, 0.9996)
    # No accepted trial cuts more than the one chosen; the chosen one is what the search tried.
    assert max(t.flops_cut for t in tried if t.accepted) == pytest.approx(schedule.flops_cut)
    variant, outcome = apply_pass(encoder, "merge_tokens", CONTEXT, **schedule.knobs)
    assert outcome.applied and splits.figure(variant, "calibration").quality == pytest.approx(
        schedule.calibration.quality)
    # An impossible budget finds nothing and says why.
    none = merge_schedule(encoder, splits, 1.01, CONTEXT, max_trials=2)
    assert none.knobs is None and "no merge_tokens schedule within budget 1.01" in none.why_none(1.01)


def test_budget_drives_the_search_grid(driven):
    settings, schedules = driven
    assert set(schedules) == {"merge_tokens", "prune_tokens"}
    for name, schedule in schedules.items():
        if schedule.knobs is None:
            assert settings.knob_grid[name] == [] and "within budget" in settings.unsearched[name]
        else:
            assert settings.knob_grid[name] == [schedule.knobs] and name not in settings.unsearched
    assert settings.knob_grid["local_attention"] == default_knob_grid()["local_attention"]


def test_prune_schedule_is_progressive_with_merged_sizes(driven):
    schedule = driven[1]["prune_tokens"]
    for trial in schedule.trials:
        assert trial.accepted == (trial.calibration is not None and within_budget(trial.calibration, 0.9996))
        assert trial.knobs["layers"] == [0] and trial.knobs["merge"] is True  # 2 layers: cut after the first


def test_heldout_below_budget_is_not_eligible_and_says_so(encoder):
    """Calibration rows that are mostly padding (merging drops padding first: no loss) pass; full held-out
    rows fall below the budget: the variant is reported with its held-out figure and not ranked."""
    from tfcompile.optimize import _judge_on_splits
    from tfcompile.report import VariantReport

    easy = _splits(encoder, _rows(8, 32, [10], 3), _rows(8, 32, [32], 4))
    variant, outcome = apply_pass(encoder, "merge_tokens", CONTEXT, r=[8, 6])
    assert outcome.applied
    calibration, heldout = easy.figure(variant, "calibration"), easy.figure(variant, "heldout")
    lower = calibration.quality - Z * calibration.stderr
    assert lower > heldout.quality
    budget = (lower + heldout.quality) / 2
    report = VariantReport("v", ["merge_tokens"], False, {"cpu": 1.0}, "roofline", 1.0, 1.0)
    _judge_on_splits(report, variant, easy, budget)
    assert not report.eligible
    assert report.quality == pytest.approx(heldout.quality)
    assert "calibration text but not on held-out text" in report.note


@pytest.mark.slow  # ~15 schedule trials and a variant search on full-size minilm (minutes on 2 shared cores)
def test_minilm_budget_finds_a_28_percent_cut_within_budget_on_heldout_text():
    """Issue 23: `optimize minilm --allow-approx --budget 0.98` with no knobs cuts >= 28 % of FLOPs at held-out
    cosine >= 0.98."""
    from tfcompile.optimize import OptimizeSettings, optimize

    graph = load_model("minilm", LoadOptions(batch=1, seq=128))
    result = optimize(graph, OptimizeSettings(target="cpu", allow_approx=True, budget=0.98))
    result.cleanup()
    reports = {r.name: r for r in result.reports}
    best, baseline = reports[result.best], reports["baseline"]
    assert not best.exact and best.quality_metric == "mean_cosine"
    # The deepest token cut within budget; on a CPU with VNNI an int8 variant can be predicted faster still
    # (then it is the best, and merging on top of it falls below the budget).
    merged = [r for r in result.reports if r.eligible and {"merge_tokens", "prune_tokens"} & set(r.passes)]
    deepest = max(merged, key=lambda r: 1 - r.flops / baseline.flops)
    assert 1 - deepest.flops / baseline.flops >= 0.28
    assert deepest.quality >= 0.98 and "held-out" in deepest.note
    assert best is deepest or best.predicted_ms["cpu"] <= deepest.predicted_ms["cpu"]
    assert "passages" in result.quality_data
    assert all("local_attention" not in r.passes for r in result.reports)  # window >= 128 tokens: refused
    for report in result.reports:
        if not report.exact and report.eligible:
            assert report.quality >= 0.98


def test_user_sentences_need_a_text_model_of_the_tokenizer_vocabulary(encoder):
    from tfcompile.errors import InvalidOptionError

    lines = ["A first sentence about the language reference.", "Another one, held out."] * 8
    with pytest.raises(InvalidOptionError, match="vocabulary has 512 entries"):
        QualitySplits.from_lines(encoder, lines, "--calibration-data s.txt")
    with pytest.raises(InvalidOptionError, match="need at least 8"):
        QualitySplits.from_lines(encoder, lines[:3], "--calibration-data s.txt")
    with pytest.raises(InvalidOptionError, match="needs a text model"):
        QualitySplits.from_lines(load_tiny("gpt2-small", batch=1, seq=16), lines, "--calibration-data s.txt")
