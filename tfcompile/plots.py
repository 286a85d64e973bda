"""Figures a person keeps: predicted against measured latency, and latency against quality.

``predicted_vs_measured`` and ``pareto`` build a matplotlib Figure outside
pyplot (tests read its artists); ``save`` writes it as a PNG. Every point
carries a short label ("v3 8x128": the variant's id and the batch x sequence
shape), placed where it overlaps the fewest others, and a key under the axes
spells each id out. matplotlib is imported only when a figure is built.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from tfcompile.report import VariantReport

PREDICTOR_TITLES = {"calibrated": "calibrated (profile)", "roofline": "roofline (uncalibrated)",
                    "flops_only": "FLOPs only"}
QUALITY_NAMES = {"mean_cosine": "mean cosine similarity to the original's outputs",
                 "top1_agreement": "top-1 agreement with the original"}
KEY_LINE_IN = 0.16  # height of one line of the key under the axes, inches
FONT = 8


class Timed(Protocol):
    """A measured point: what compare.ComparisonRow holds."""

    measured_ms: float
    predicted_ms: dict[str, float]


@dataclasses.dataclass(frozen=True)
class QualityPoint:
    """One variant on the latency-quality plane."""

    label: str  # "v3"; variants at the same place share one point, labelled "v3, v5"
    quality: float  # exact variants sit at 1
    latency_ms: float
    exact: bool
    eligible: bool
    best: bool = False


def short_name(model: str | os.PathLike) -> str:
    """A model argument as a title shows it: a path's last part, never its directories."""
    return Path(os.fspath(model)).name or os.fspath(model)


def variant_ids(names: Sequence[str]) -> dict[str, str]:
    """Short ids in order of first appearance: "base" for the baseline, then "v1", "v2", ..."""
    ids: dict[str, str] = {}
    for name in names:
        if name not in ids:
            ids[name] = "base" if name == "baseline" else f"v{sum(i != 'base' for i in ids.values()) + 1}"
    return ids


def predicted_vs_measured(rows: Sequence[Timed], scores: Mapping[str, Mapping[str, float]], *, title: str,
                          labels: Sequence[str], key: Mapping[str, str]):
    """One panel per predictor in ``scores``: predicted against measured latency, log-log, with the ±10 % band,
    every point labelled (``labels``, one per row), MAPE / within ±10 % / Kendall τ over each panel.

    ``key``: short id -> the variant it stands for, printed under the panels."""
    predictors = [p for p in scores if all(p in r.predicted_ms for r in rows)] or ["roofline"]
    key_lines = _key_lines(key)
    layout = _Layout(panel_w=4.3, panel_h=4.3, panels=len(predictors), key_lines=len(key_lines), panel_title_lines=3)
    fig = _figure(layout.size)
    fig.suptitle(title, fontsize=11, y=layout.suptitle_y)
    values = [r.measured_ms for r in rows] + [r.predicted_ms[p] for r in rows for p in predictors]
    low, high = min(values) / 1.35, max(values) * 1.35
    for index, predictor in enumerate(predictors):
        ax = fig.add_axes(layout.rect(index))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.plot([low, high], [low, high], color="grey", linewidth=1, label="predicted = measured")
        ax.fill_between([low, high], [low * 0.9, high * 0.9], [low * 1.1, high * 1.1], color="grey", alpha=0.15,
                        linewidth=0, label="±10 %")
        xs, ys = [r.measured_ms for r in rows], [r.predicted_ms[predictor] for r in rows]
        ax.scatter(xs, ys, s=22, color="C0", zorder=3, label="a variant at batch x seq")
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        _plain_log_ticks(ax, low, high)
        ax.set_xlabel("measured latency (ms)")
        ax.set_ylabel(f"predicted latency (ms), {predictor}")
        ax.grid(alpha=0.25, which="both")
        ax.set_title(f"{PREDICTOR_TITLES.get(predictor, predictor)}\n{_error_text(scores.get(predictor), len(rows))}",
                     fontsize=FONT + 1, loc="left")
        _place_labels(ax, xs, ys, labels)
    fig.legend(*ax.get_legend_handles_labels(), loc="center", ncol=3, fontsize=FONT,
               bbox_to_anchor=(0.5, layout.legend_y), frameon=False)
    _draw_key(fig, key_lines, layout)
    return fig


def pareto(points: Sequence[QualityPoint], *, title: str, budget: float, quality_label: str, latency_label: str,
           key: Mapping[str, str]):
    """Latency against quality for every variant: the Pareto front (lowest latency for at least that quality)
    as a step line, the budget as a vertical line, rejected variants as red crosses, the chosen one ringed.

    When variants far below the budget squeeze the eligible ones into a corner, a second panel zooms in on
    the budget and above."""
    key_lines = _key_lines(key)
    qualities = [p.quality for p in points] + [budget]
    span = max(max(qualities) - min(qualities), 1e-3)
    full = (min(qualities) - 0.08 * span, max(qualities) + 0.08 * span)
    window = max(max(qualities) - budget, 1e-3)
    zoom = (budget - 0.25 * window, max(qualities) + 0.1 * window)
    panels = [("all variants", full)] + ([(f"zoom: quality from {zoom[0]:.4g}", zoom)]
                                         if window < 0.35 * span and len(points) > 1 else [])
    layout = _Layout(panel_w=5.6 if len(panels) > 1 else 8.0, panel_h=4.6, panels=len(panels),
                     key_lines=len(key_lines), panel_title_lines=1 if len(panels) > 1 else 0)
    fig = _figure(layout.size)
    fig.suptitle(title, fontsize=11, y=layout.suptitle_y)
    front = [points[i] for i in pareto_front([(p.quality, p.latency_ms) for p in points])]
    for index, (panel_title, xlim) in enumerate(panels):
        ax = fig.add_axes(layout.rect(index))
        shown = [p for p in points if xlim[0] <= p.quality <= xlim[1]]
        _pareto_panel(ax, shown, front, budget, xlim)
        ax.set_xlabel(quality_label)
        ax.set_ylabel(latency_label)
        if len(panels) > 1:
            ax.set_title(panel_title, fontsize=FONT + 1, loc="left")
        if index == 0:
            fig.legend(*ax.get_legend_handles_labels(), loc="center", ncol=6, fontsize=FONT,
                       bbox_to_anchor=(0.5, layout.legend_y), frameon=False)
        _place_labels(ax, [p.quality for p in shown], [p.latency_ms for p in shown], [p.label for p in shown])
    _draw_key(fig, key_lines, layout)
    return fig


def _pareto_panel(ax, points: Sequence[QualityPoint], front: Sequence[QualityPoint], budget: float,
                  xlim: tuple[float, float]) -> None:
    kinds = (("exact", "o", "C0", lambda p: p.exact and p.eligible),
             ("approximate, within budget", "D", "C2", lambda p: not p.exact and p.eligible),
             ("rejected", "x", "C3", lambda p: not p.eligible))
    for label, marker, color, belongs in kinds:
        chosen = [p for p in points if belongs(p)]
        if chosen:
            ax.scatter([p.quality for p in chosen], [p.latency_ms for p in chosen], s=36, marker=marker, color=color,
                       zorder=3, label=label)
    best = [p for p in points if p.best]
    if best:
        ax.scatter([p.quality for p in best], [p.latency_ms for p in best], s=180, marker="o", facecolors="none",
                   edgecolors="black", linewidths=1.0, zorder=4, label="chosen")
    ax.plot([p.quality for p in front], [p.latency_ms for p in front], drawstyle="steps-pre", color="C1",
            linewidth=1.5, zorder=2, label="Pareto front")
    ax.set_xlim(*xlim)
    latencies = [p.latency_ms for p in points]
    pad = max(max(latencies) - min(latencies), 0.05 * max(latencies)) * 0.12
    ax.set_ylim(max(min(latencies) - pad, 0), max(latencies) + pad)
    ax.axvline(budget, color="C3", linestyle="--", linewidth=1.2, label=f"budget {budget:g}")
    ax.axvspan(xlim[0], budget, color="C3", alpha=0.06, linewidth=0)
    ax.grid(alpha=0.3)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (quality, latency) points no other point beats: at least as good in both, better in one.

    In order of rising quality; of identical points, the first."""
    front = []
    for i, (quality, latency) in enumerate(points):
        dominated = any((q >= quality and ms <= latency and (q > quality or ms < latency))
                        or ((q, ms) == (quality, latency) and j < i) for j, (q, ms) in enumerate(points))
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def pareto_of_reports(reports: Sequence[VariantReport], *, target: str, budget: float, best: str | None,
                      title: str):
    """``pareto`` for ``optimize``'s ranked variants: their id (or rank), predicted or expected latency on
    ``target``, and quality (1 for an exact variant)."""
    ids = report_ids(reports)
    places: dict[tuple, list[VariantReport]] = {}
    for report in reports:
        quality = 1.0 if report.exact or report.quality is None else report.quality
        place = (round(quality, 6), round(report.objective_ms(target), 6), report.exact, report.eligible)
        places.setdefault(place, []).append(report)
    points = [QualityPoint(", ".join(ids[r.name] for r in group), quality, latency, exact, eligible,
                           best=any(r.name == best for r in group))
              for (quality, latency, exact, eligible), group in places.items()]
    metrics = sorted({r.quality_metric for r in reports if r.quality_metric})
    quality_label = "quality: " + " / ".join(QUALITY_NAMES.get(m, m) for m in metrics) if metrics else "quality"
    expected = any(r.expected_ms is not None for r in reports)
    how = sorted({r.prediction for r in reports})
    latency_label = f"{'expected' if expected else 'predicted'} latency on {target} (ms, {', '.join(how)})"
    key = {ids[r.name]: r.name + ("" if r.eligible else f"  [rejected: {_rejection(r)}]") for r in reports}
    return pareto(points, title=title, budget=budget, quality_label=quality_label + " (exact variants at 1)",
                  latency_label=latency_label, key=key)


def report_ids(reports: Sequence[VariantReport]) -> dict[str, str]:
    """Variant name -> the short id the report gives it, or, before ids are assigned, one in rank order."""
    given = {r.name: r.id for r in reports}  # ids come with report.assign_ids
    if all(given.values()):
        return given
    return variant_ids([r.name for r in reports])


def save(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``."""
    fig.savefig(path, format="png", dpi=120)


def _rejection(report: VariantReport) -> str:
    return report.rejected or report.note or "not eligible"


def _figure(size: tuple[float, float]):
    """A figure outside pyplot (no global state, nothing to close), drawn by Agg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where things go, in inches from the top: title, legend, panel titles, panels in a row, the key."""

    panel_w: float
    panel_h: float
    panels: int
    key_lines: int
    panel_title_lines: int
    left: float = 0.85
    gap: float = 0.8
    right: float = 0.3

    @property
    def top(self) -> float:  # title and legend, then the panels' own titles
        return 0.75 + 0.17 * self.panel_title_lines

    @property
    def key_h(self) -> float:
        return KEY_LINE_IN * self.key_lines + 0.2

    @property
    def size(self) -> tuple[float, float]:
        width = self.left + self.panels * self.panel_w + (self.panels - 1) * self.gap + self.right
        return width, self.top + self.panel_h + 0.6 + self.key_h

    @property
    def suptitle_y(self) -> float:
        return 1 - 0.12 / self.size[1]

    @property
    def legend_y(self) -> float:
        return 1 - 0.5 / self.size[1]

    def rect(self, index: int) -> list[float]:
        width, height = self.size
        left = self.left + index * (self.panel_w + self.gap)
        return [left / width, (height - self.top - self.panel_h) / height, self.panel_w / width, self.panel_h / height]


def _error_text(score: Mapping[str, float] | None, n: int) -> str:
    if not score:
        return "no score"
    within = round(score["within_10pct"] * n)
    return (f"MAPE {score['mape']:.1%}, within ±10 % {score['within_10pct']:.0%} ({within} of {n})\n"
            f"Kendall τ {score['kendall_tau']:.3f}")


def _key_lines(key: Mapping[str, str]) -> list[str]:
    """One line per id, "base" first, then v1, v2, ... in number order."""
    width = max((len(k) for k in key), default=0)
    ordered = sorted(key, key=lambda short: (short != "base", len(short), short))
    return [f"{short.ljust(width)}  {key[short] if len(key[short]) <= 150 else key[short][:149] + '…'}"
            for short in ordered]


def _plain_log_ticks(ax, low: float, high: float) -> None:
    """Tick labels as plain numbers (0.2, 30), not powers of ten; the minor ticks labelled too within a decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain if high / low < 20 else NullFormatter())


def _draw_key(fig, lines: list[str], layout: _Layout) -> None:
    width, height = layout.size
    fig.text(layout.left / width, 0.1 / height, "\n".join(lines), ha="left", va="bottom", fontsize=FONT,
             family="monospace", linespacing=1.35)


# Label offsets in points, nearest first: the four diagonals, then the sides, on rings further out.
_DIRECTIONS = ((1, 1), (-1, 1), (1, -1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
_OFFSETS = [(dx * r, dy * r) for r in (5, 13, 24, 38) for dx, dy in _DIRECTIONS]


def _place_labels(ax, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str]) -> None:
    """Annotate every point, each label at the nearest offset where it overlaps no point or label and stays
    inside the axes (failing that, where it overlaps least), with a leader line when it sits far off."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    radius = 3.5 * fig.dpi / 72
    centres = ax.transData.transform(list(zip(xs, ys)))
    taken = [Bbox.from_bounds(x - radius, y - radius, 2 * radius, 2 * radius) for x, y in centres]
    for i in sorted(range(len(labels)), key=lambda i: (xs[i], ys[i])):
        best = None
        for dx, dy in _OFFSETS:
            box = _label_box(ax, labels[i], (xs[i], ys[i]), (dx, dy), renderer)
            cost = sum(_overlap(box, other) for other in taken) + \
                10 * (box.width * box.height - _overlap(box, inside))
            if best is None or cost < best[0]:
                best = (cost, (dx, dy), box)
            if cost == 0:
                break
        _, (dx, dy), box = best
        far = abs(dx) + abs(dy) > 20
        ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", fontsize=FONT,
                    ha=_HA[dx > 0, dx < 0], va=_VA[dy > 0, dy < 0], zorder=5,
                    arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.6} if far else None)
        taken.append(box)


_HA = {(True, False): "left", (False, True): "right", (False, False): "center"}
_VA = {(True, False): "bottom", (False, True): "top", (False, False): "center"}


def _label_box(ax, text: str, xy, offset, renderer):
    dx, dy = offset
    probe = ax.annotate(text, xy, xytext=offset, textcoords="offset points", fontsize=FONT,
                        ha=_HA[dx > 0, dx < 0], va=_VA[dy > 0, dy < 0])
    box = probe.get_window_extent(renderer).padded(1.5)
    probe.remove()
    return box


def _overlap(a, b) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0
