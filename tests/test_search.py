"""The search picks what the target's cost model says, so the choice depends on the target."""

import json

import pytest

from tests.test_cli import tfcompile


def _best(tmp_path, target, shape):
    out = tmp_path / f"{target}-{shape}"
    result = tfcompile("optimize", "tests.tiny:lowrank_ffn", "--target", target, "--input-shape",
                       f"x={shape}:float32", "-o", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    return next(v for v in report["variants"] if v["name"] == report["best"])


@pytest.mark.slow  # three CLI subprocesses; test_premerge_choice_in_process is its fast twin
def test_premerge_depends_on_device_and_token_count(tmp_path):
    # One token on an H100: one dense GEMM launch beats two low-rank launches.
    gpu_decode = _best(tmp_path, "h100", "1x1x256")
    assert "premerge_ffn" in gpu_decode["passes"] and gpu_decode["name"] == "premerge_ffn"
    assert gpu_decode["max_rel_err"] <= 1e-5
    # Many tokens on the H100, or any token count on this CPU: the low-rank form reads
    # and computes less, so the structured model stays as it is.
    assert "premerge_ffn" not in _best(tmp_path, "h100", "64x128x256")["passes"]
    assert "premerge_ffn" not in _best(tmp_path, "cpu", "1x1x256")["passes"]


def _best_in_process(target, shape):
    import torch

    from tfcompile.frontend import LoadOptions, load_model
    from tfcompile.optimize import OptimizeSettings, optimize

    graph = load_model("tests.tiny:lowrank_ffn",
                       LoadOptions(input_shapes={"x": shape}, input_dtypes={"x": torch.float32}))
    result = optimize(graph, OptimizeSettings(target=target))
    result.cleanup()
    return next(r for r in result.reports if r.name == result.best)


def test_premerge_choice_in_process():
    """Fast twin of test_premerge_depends_on_device_and_token_count: the same searches, without the CLI."""
    gpu_decode = _best_in_process("h100", (1, 1, 256))
    assert "premerge_ffn" in gpu_decode.passes and gpu_decode.name == "premerge_ffn"
    assert gpu_decode.max_rel_err <= 1e-5
    assert "premerge_ffn" not in _best_in_process("h100", (64, 128, 256)).passes
    assert "premerge_ffn" not in _best_in_process("cpu", (1, 1, 256)).passes


def _minilm_search(allow_approx, budget):
    from tfcompile.frontend import LoadOptions, load_model
    from tfcompile.optimize import OptimizeSettings, optimize

    graph = load_model("minilm", LoadOptions(batch=2, seq=32))  # real English text as example inputs
    result = optimize(graph, OptimizeSettings(target="cpu", allow_approx=allow_approx, budget=budget,
                                              pipeline=None))
    result.cleanup()
    return [r for r in result.reports if "prune_tokens" in r.passes]


@pytest.mark.slow  # two searches of full-size minilm; twin: test_token_pruning_search_on_a_tiny_encoder
def test_token_pruning_is_searched_only_with_allow_approx_and_ranked_only_within_budget():
    assert _minilm_search(allow_approx=False, budget=0.99) == []
    pruned = _minilm_search(allow_approx=True, budget=0.97)
    assert pruned, "prune_tokens never applied to minilm"
    for report in pruned:
        # The schedule came from the budget (calibration passages); the figure is the held-out one.
        assert report.quality_metric == "mean_cosine" and 0 < report.quality < 1
        assert "held-out" in report.note
        assert not report.eligible or report.quality >= 0.97


def test_token_pruning_search_on_a_tiny_encoder():
    """Fast twin of the minilm search above: a 2-layer, hidden-64 mean-pooled BERT."""
    from tfcompile.frontend import LoadOptions, load_model
    from tfcompile.optimize import OptimizeSettings, optimize

    graph = load_model("tests.tiny:mean_pooled_bert", LoadOptions(batch=2, seq=32))

    def approximate(allow_approx, budget):
        result = optimize(graph, OptimizeSettings(target="cpu", allow_approx=allow_approx, budget=budget))
        result.cleanup()
        return [r for r in result.reports if not r.exact]

    assert [r for r in approximate(allow_approx=False, budget=0.99) if "prune_tokens" in r.passes] == []
    reports = approximate(allow_approx=True, budget=0.99)
    pruned = [r for r in reports if "prune_tokens" in r.passes]
    assert pruned, "prune_tokens never applied to the tiny encoder"
    for report in pruned:
        assert report.quality_metric == "mean_cosine" and 0 < report.quality < 1
    for report in reports:
        assert report.eligible == (report.quality >= 0.99)
    assert any(not r.eligible for r in pruned)  # the deep cut at layer 0 falls below 0.99 here (0.984)
    assert any(r.eligible for r in reports)  # milder approximations (merge_tokens r=4) stay within it
