"""benchmarks/cost_model_accuracy.py: its held-out sets cover issue 26's list, and its per-family figures.

The script is loaded from its file (benchmarks/ is not a package); nothing here builds a model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tfcompile.compare import ComparisonRow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cost_model_accuracy.py"
MAX_POSITIONS = {"bert-base": 512, "minilm": 512, "gpt2-small": 1024, "llama-tiny": 2048}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cost_model_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_full_set_covers_the_issues_models_shapes_and_pass_families(bench):
    full = bench.SETS["full"]
    variants = [(config, held) for config in full for held in config.variants]
    assert len(variants) >= 30
    assert {c.model for c in full} == {"bert-base", "gpt2-small", "vit-base", "minilm", "llama-tiny"}
    assert {c.batch for c in full} >= {1, 8}
    seqs = {c.seq for c in full if c.seq}
    assert min(seqs) == 128 and max(seqs) == 2048
    assert {h.family for _, h in variants} == {"baseline", "cleanup", "merges", "norm rewrites", "padding removal",
                                               "local attention", "token merging"}
    for config in full:
        assert config.seq <= MAX_POSITIONS.get(config.model, 0) or not config.seq, config.label
        names = [h.name for h in config.variants]
        assert names[0] == "baseline" and len(set(names)) == len(names), config.label
        assert all(" " not in name for name in names)  # speed-ups pair rows by the name's last word
    assert any(c.label == bench.SPEEDUP_CHECK[0] and bench.SPEEDUP_CHECK[1] in [h.name for h in c.variants]
               for c in full)


def test_ragged_configs_draw_the_same_lengths_for_a_seed(bench):
    config = next(c for c in bench.SETS["full"] if c.ragged)
    lengths = config.lengths(0)
    assert lengths == config.lengths(0) and len(lengths) == config.batch
    assert all(bench.RAGGED_MIN_TOKENS <= n <= config.seq for n in lengths)


def _row(name, measured_ms, predicted_ms):
    return ComparisonRow(name, measured_ms, {"calibrated": predicted_ms, "roofline": predicted_ms})


def test_family_breakdown_scores_each_family_against_its_own_baselines(bench):
    rows = [_row("m b1 s8 baseline", 100.0, 100.0), _row("m b1 s8 cleanup", 50.0, 100.0),
            _row("m b1 s8 cleanup+local_w4", 80.0, 80.0),
            _row("n b1 s8 baseline", 10.0, 11.0), _row("n b1 s8 cleanup", 10.0, 11.0)]
    families = {"m b1 s8 baseline": "baseline", "m b1 s8 cleanup": "cleanup", "m b1 s8 cleanup+local_w4":
                "local attention", "n b1 s8 baseline": "baseline", "n b1 s8 cleanup": "cleanup"}
    breakdown = bench.family_breakdown(rows, families)
    assert list(breakdown) == ["baseline", "cleanup", "local attention"]
    assert breakdown["baseline"]["variants"] == 2 and "speedups" not in breakdown["baseline"]
    assert breakdown["baseline"]["scores"]["calibrated"]["mape"] == pytest.approx(0.05)
    cleanup = breakdown["cleanup"]["speedups"]["calibrated"]
    # m: measured 2.00x, predicted 1.00x (100 points off); n: 1.00x both.
    assert cleanup["variants"] == 2 and cleanup["median_error_pp"] == pytest.approx(50.0)
    assert cleanup["worst"]["variant"] == "m b1 s8 cleanup"
    assert breakdown["local attention"]["speedups"]["calibrated"]["median_error_pp"] == pytest.approx(0.0)


def test_speedup_check_reports_llama_tiny_s512_cleanup(bench):
    config, variant = bench.SPEEDUP_CHECK
    rows = [_row(f"{config} baseline", 452.0, 215.0), _row(f"{config} {variant}", 329.0, 213.0)]
    check = bench.speedup_check(rows)
    assert check["measured_speedup"] == pytest.approx(452 / 329)
    assert check["calibrated"]["predicted_speedup"] == pytest.approx(215 / 213)
    assert check["calibrated"]["relative_error"] == pytest.approx((215 / 213) / (452 / 329) - 1)
    assert bench.speedup_check(rows[:1]) is None
