"""The ``optimize`` table as a user reads it: one short row per variant, a legend, the warnings.

At 80 columns every row must still be told apart, so rows carry short ids
(``v3``) and the passes go in a legend underneath; ``wide`` puts them in the
table. A rejected row says why in its status column, a variant that changed
nothing is folded into the simpler one it equals, and measured timings carry
their spread, so a busy machine shows in the figures rather than in a rerun.
"""

from __future__ import annotations

import dataclasses
import textwrap

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tfcompile.report import VariantReport

# p10-p90 wider than this share of the median: the runs did not see one machine state (other load, frequency
# changes), so the median is worth less than it looks.
BUSY_SPREAD = 0.25


@dataclasses.dataclass(frozen=True)
class TableCaption:
    """What the table's figures rest on: the prediction's provenance and the measuring host."""
    prediction: str  # e.g. "roofline from this host's detected peaks, uncalibrated"
    host: str | None = None  # the runtime and the host that measured, when anything was measured
    batch: int | None = None  # sequences per run, for throughput


def render_table(variants: list[VariantReport], target: str, console: Console, title: str,
                 caption: TableCaption, *, wide: bool = False) -> None:
    shown = [v for v in variants if wide or v.folded_into is None]
    measured = any(v.measured_ms is not None for v in shown)
    over_workload = any(v.expected_ms is not None for v in shown)
    throughput = measured and caption.batch is not None and caption.batch > 1
    # No outer edges and one space between columns: nine columns fit 80 characters.
    table = Table(title=Text(title), box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, show_edge=False,
                  caption=Text(_caption_text(caption, measured)), caption_justify="left")
    table.add_column("id", no_wrap=True)
    if wide:
        table.add_column("variant", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("exp. ms" if over_workload else "pred ms", justify="right")
    if measured:
        table.add_column("meas ms", justify="right")
        table.add_column("p10-p90", justify="right")
        table.add_column("x base", justify="right")
        if throughput:
            table.add_column("seq/s", justify="right")
    table.add_column("quality", justify="right", no_wrap=not wide)
    baseline = next((v for v in variants if v.name == "baseline"), None)
    for v in shown:
        row = [v.id]
        if wide:
            row.append(v.name)
        row += [status_of(v, variants), f"{v.objective_ms(target):.2f}"]
        if measured:
            row += _measured_cells(v, baseline, throughput)
        row.append(_quality_cell(v))
        # Names and reasons are text: "layers=[2]" or "[batch, seq]" would otherwise read as markup.
        table.add_row(*(Text(cell) for cell in row), style=None if v.eligible else "dim")
    console.print(table)
    # The legend spells out ids; with --wide the names are in the table and only the reasons are added.
    lines = legend(variants) if not wide else [f"{v.id:>4}  {v.note}" for v in shown if not v.eligible and v.note]
    for line in lines:
        console.print(wrapped(line, console.width, indent=6), highlight=False, markup=False)
    for line in warnings_for(shown):
        console.print(wrapped(line, console.width, indent=2), style="yellow", highlight=False, markup=False)


def status_of(v: VariantReport, variants: list[VariantReport]) -> str:
    if v.folded_into is not None:
        return f"= {v.folded_into}"
    if not v.eligible:
        return v.rejected or "rejected"
    rank = 1 + [other for other in variants if other.eligible].index(v)
    if rank == 1:
        return "best"
    return "baseline" if v.name == "baseline" else f"#{rank}"


def _measured_cells(v: VariantReport, baseline: VariantReport | None, throughput: bool) -> list[str]:
    if v.measured_ms is None:
        return ["", "", ""] + ([""] if throughput else [])
    spread = v.measured_spread
    cells = [f"{v.measured_ms:.2f}", f"{spread['p10']:.1f}-{spread['p90']:.1f}" if spread else ""]
    if v.vs_baseline is not None:
        cells.append(f"{v.vs_baseline['median']:.2f}x")
    elif baseline is not None and baseline.measured_ms:
        cells.append(f"{v.measured_ms / baseline.measured_ms:.2f}x")
    else:
        cells.append("")
    if throughput:
        cells.append(f"{v.throughput_per_s:.0f}" if v.throughput_per_s else "")
    return cells


def _quality_cell(v: VariantReport) -> str:
    if v.exact:
        return "exact" if v.max_rel_err is None else f"exact {v.max_rel_err:.0e}"
    if v.quality is None:
        return "approx"
    metric = {"mean_cosine": "cos", "top1_agreement": "top1"}.get(v.quality_metric or "", v.quality_metric)
    return f"{metric} {v.quality:.4f}"


def legend(variants: list[VariantReport]) -> list[str]:
    """One line per variant: its id, its passes with their knobs, and for a rejected one the full reason."""
    lines = []
    folded: dict[str, list[str]] = {}
    for v in variants:
        if v.folded_into is not None:
            folded.setdefault(v.folded_into, []).append(v.id)
            continue
        what = (v.name.replace("+", " + ").replace(",", ", ") if v.name != "baseline"
                else "baseline (the model as traced)")
        reason = f" -- {v.note}" if not v.eligible and v.note else ""
        lines.append(f"{v.id:>4}  {what}{reason}")
    for kept, ids in folded.items():
        lines.append(f"      {', '.join(ids)}: same cost and quality as {kept} with more passes (changed nothing; "
                     "--wide shows them)")
    return lines


def warnings_for(variants: list[VariantReport]) -> list[str]:
    """Spread that says the machine was busy, and speed-ups the spread does not support."""
    lines = []
    for v in variants:
        spread = v.measured_spread
        if spread and spread["median"] and (spread["p90"] - spread["p10"]) / spread["median"] > BUSY_SPREAD:
            width = (spread["p90"] - spread["p10"]) / spread["median"]
            lines.append(f"{v.id}: its runs spread {width:.0%} of the median (p10-p90 over {spread['runs']} runs): "
                         "the machine looked busy; rerun on a quiet machine or with more --repeat")
        ratio = v.vs_baseline
        if ratio and v.name != "baseline" and ratio["p10"] < 1.0 < ratio["p90"]:
            lines.append(f"{v.id}: {ratio['median']:.2f}x the baseline, but run by run the ratio spans "
                         f"{ratio['p10']:.2f}-{ratio['p90']:.2f}x: not a reliable difference")
    return lines


def roofline_line(variants: list[VariantReport], prediction: dict, target: str) -> list[str]:
    """When this host is the target and no profile calibrates it: how far the roofline was off here (measured
    variants), or that it can be, and how to calibrate."""
    if prediction.get("kind") != "roofline" or target != "cpu":
        return []
    backend = prediction.get("backend", "ort")
    calibrate = f"`tfcompile calibrate --target cpu --backend {backend}` fits a profile for this host"
    errors = [f"{v.id} {(v.objective_ms(target) - v.measured_ms) / v.measured_ms:+.0%}"
              for v in variants if v.measured_ms]
    if errors:
        return [f"no calibration profile for cpu/{backend}: the roofline was off by {', '.join(errors)} against "
                f"the measured times; {calibrate}"]
    return [f"no calibration profile for cpu/{backend}: predictions are roofline figures from this host's peaks, "
            f"which can be off by 2x or more on small models (--measure shows how far); {calibrate}"]


def wrapped(line: str, width: int, *, indent: int) -> str:
    """Wrapped at spaces, continuation lines indented so the ids stay in a column of their own."""
    return textwrap.fill(line, width=max(width, 40), subsequent_indent=" " * indent, break_long_words=False,
                         break_on_hyphens=False)


def _caption_text(caption: TableCaption, measured: bool) -> str:
    text = f"predicted: {caption.prediction}"
    if measured and caption.host:
        text += f"\nmeasured: {caption.host}"
    return text

