"""The figures: every point labelled, error figures and titles readable, the Pareto front the non-dominated set."""

import itertools
import json
import random

import pytest
from matplotlib.collections import PathCollection
from matplotlib.text import Annotation, Text

from tfcompile import plots
from tfcompile.compare import ComparisonRow, score
from tfcompile.report import VariantReport

VARIANTS = ("baseline", "cleanup", "cleanup+merge_qkv_projections")


def _rows() -> list[ComparisonRow]:
    """Three variants at four shapes, as `tfcompile compare` names them; predictors off by set factors."""
    rng = random.Random(0)
    rows = []
    for batch, seq in itertools.product((1, 8), (32, 128)):
        for i, variant in enumerate(VARIANTS):
            measured = 0.4 * batch * seq / 32 * (1 - 0.1 * i) * rng.uniform(0.9, 1.1)
            rows.append(ComparisonRow(f"minilm b{batch} s{seq} {variant}", measured,
                                      {"calibrated": measured * rng.uniform(0.85, 1.15),
                                       "roofline": measured * rng.uniform(0.3, 0.6),
                                       "flops_only": measured * rng.uniform(0.5, 1.5)}))
    return rows


def _figure_of_compare(rows, monkeypatch, tmp_path, title):
    """compare.plot's figure, caught on its way to the file."""
    from tfcompile import compare

    built = []
    monkeypatch.setattr(plots, "save", lambda fig, path: built.append(fig))
    compare.plot(rows, tmp_path / "compare.png", title=title)
    return built[0]


def _annotations(ax) -> list[Annotation]:
    return [t for t in ax.texts if isinstance(t, Annotation)]


def _points(ax) -> list[tuple[float, float]]:
    """The scattered points (fill_between's band is a collection too, but no PathCollection)."""
    return [tuple(xy) for c in ax.collections if isinstance(c, PathCollection) for xy in c.get_offsets().tolist()]


def _texts(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))


def test_compare_plot_labels_every_point_by_variant_and_shape(monkeypatch, tmp_path):
    rows = _rows()
    fig = _figure_of_compare(rows, monkeypatch, tmp_path, title="minilm on cpu (ort)")
    axes = fig.get_axes()
    assert [ax.get_title(loc="left").splitlines()[0] for ax in axes] == \
        ["calibrated (profile)", "roofline (uncalibrated)", "FLOPs only"]
    for ax in axes:
        annotations = _annotations(ax)
        assert sorted(a.xy for a in annotations) == sorted(_points(ax)) and len(annotations) == len(rows)
        assert {a.get_text() for a in annotations} == {f"{v} {b}x{s}" for v in ("base", "v1", "v2")
                                                        for b in (1, 8) for s in (32, 128)}
        assert "(ms)" in ax.get_xlabel() and "(ms)" in ax.get_ylabel()
    key = _texts(fig)
    assert "v1    cleanup" in key and "v2    cleanup+merge_qkv_projections" in key


def test_error_figures_of_each_predictor_are_on_the_plot(monkeypatch, tmp_path):
    rows = _rows()
    fig = _figure_of_compare(rows, monkeypatch, tmp_path, title="minilm on cpu (ort)")
    text = _texts(fig)
    for figures in score(rows).values():
        within = round(figures["within_10pct"] * len(rows))
        assert f"MAPE {figures['mape']:.1%}" in text
        assert f"within ±10 % {figures['within_10pct']:.0%} ({within} of {len(rows)})" in text
        assert f"Kendall τ {figures['kendall_tau']:.3f}" in text


def test_labels_do_not_overlap_each_other_or_the_points(monkeypatch, tmp_path):
    fig = _figure_of_compare(_rows(), monkeypatch, tmp_path, title="t")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.get_axes():
        boxes = [Text.get_window_extent(a, renderer) for a in _annotations(ax)]  # the text, not its leader line
        for one, other in itertools.combinations(boxes, 2):
            assert not one.overlaps(other), (one, other)
        for x, y in ax.transData.transform(_points(ax)):
            assert not any(box.contains(x, y) for box in boxes)


@pytest.mark.parametrize("model,name", [("/tmp/tfcompile-run-x1y2/model.onnx", "model.onnx"),
                                        ("models/my-bert/", "my-bert"), ("minilm", "minilm"),
                                        ("tests.tiny:bert", "tests.tiny:bert")])
def test_titles_name_a_model_without_its_directories(model, name):
    assert plots.short_name(model) == name


def _reports(n: int, seed: int) -> list[VariantReport]:
    rng = random.Random(seed)
    reports = []
    for i in range(n):
        exact = i < 3
        quality = None if exact else 0.97 if i == n - 1 else rng.choice([1.0, 0.9995, 0.995, 0.99, 0.985, 0.97])
        reports.append(VariantReport(name="baseline" if i == 0 else f"cleanup+pass{i}", passes=[f"pass{i}"],
                                     exact=exact, predicted_ms={"cpu": round(rng.uniform(0.3, 1.2), 2)},
                                     prediction="roofline", flops=1.0, bytes=1.0, quality=quality,
                                     quality_metric=None if exact else "mean_cosine",
                                     eligible=exact or quality >= 0.98))
    return reports


def _non_dominated(points):
    return {p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)}


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_is_the_non_dominated_points(seed):
    rng = random.Random(seed)
    points = [(rng.choice([0.9, 0.95, 0.99, 1.0]), rng.choice([1.0, 2.0, 3.0, 4.0])) for _ in range(12)]
    front = plots.pareto_front(points)
    assert {points[i] for i in front} == _non_dominated(points)
    assert len(front) == len({points[i] for i in front})  # of identical points, one
    assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


@pytest.mark.parametrize("seed", range(3))
def test_pareto_plot_draws_front_budget_and_rejected_variants(seed):
    reports = _reports(12, seed)
    fig = plots.pareto_of_reports(reports, target="cpu", budget=0.98, best="cleanup+pass1",
                                  title="minilm on cpu (ort): latency against quality")
    ax = fig.get_axes()[0]  # every variant; a second panel may zoom in on the budget
    place = {r.name: (1.0 if r.exact else r.quality, r.predicted_ms["cpu"]) for r in reports}
    lines = {line.get_label(): line for line in ax.get_lines()}
    front = lines["Pareto front"]
    assert set(zip(front.get_xdata(), front.get_ydata())) == _non_dominated(set(place.values()))
    assert list(lines["budget 0.98"].get_xdata()) == [0.98, 0.98]
    rejected = next(c for c in ax.collections if c.get_label() == "rejected")
    assert {tuple(p) for p in rejected.get_offsets().tolist()} == {place[r.name] for r in reports if not r.eligible}
    chosen = next(c for c in ax.collections if c.get_label() == "chosen")
    assert [tuple(p) for p in chosen.get_offsets().tolist()] == [place["cleanup+pass1"]]
    # Every variant is labelled; variants at one place share a point and a label ("v2, v5").
    labels = {a.get_text(): a.xy for a in _annotations(ax)}
    ids = plots.report_ids(reports)
    for report in reports:
        label = next(text for text in labels if ids[report.name] in text.split(", "))
        assert labels[label] == place[report.name]
    assert "/" not in fig._suptitle.get_text()
    assert "quality" in ax.get_xlabel() and "(ms" in ax.get_ylabel()
    key = _texts(fig)
    assert all(report.name in key for report in reports) and "rejected" in key


def test_pareto_plot_zooms_in_when_far_rejections_crowd_the_eligible_variants():
    reports = _reports(8, 0)
    reports[-1].quality, reports[-1].eligible = 0.5, False  # far below the budget
    fig = plots.pareto_of_reports(reports, target="cpu", budget=0.98, best=None, title="t")
    everything, zoom = fig.get_axes()
    assert zoom.get_xlim()[0] < 0.98 < zoom.get_xlim()[1] and everything.get_xlim()[0] < 0.5
    low = zoom.get_xlim()[0]
    shown = {(1.0 if r.exact else r.quality, r.predicted_ms["cpu"]) for r in reports
             if r.exact or r.quality >= low}
    assert {a.xy for a in _annotations(zoom)} == shown
    assert len(_annotations(everything)) == len({a.xy for a in _annotations(everything)}) >= len(shown) + 1


def test_optimize_with_allow_approx_writes_pareto_png_beside_the_report(tmp_path, monkeypatch):
    """One approximate pass on a tiny encoder: pareto.png is written with report.json; a failure drawing it
    leaves the earlier set as it was."""
    from tfcompile.cli import EXIT_INTERRUPTED, main

    out = tmp_path / "out"
    args = ["optimize", "tests.tiny:mean_pooled_bert", "--batch", "2", "--seq", "16", "--allow-approx",
            "--passes", "hard_attention_topk", "-o", str(out)]
    assert main(args) == 0
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "predicted_vs_measured.png").exists()  # nothing was measured
    assert any(not v["exact"] for v in json.loads((out / "report.json").read_text())["variants"])

    earlier = {path.name: path.read_bytes() for path in out.iterdir()}

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "pareto_of_reports", broken)
    assert main(args) == EXIT_INTERRUPTED
    assert {path.name: path.read_bytes() for path in out.iterdir()} == earlier
