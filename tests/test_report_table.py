"""The optimize table as an 80-column terminal shows it: rows told apart, reasons given, spread and warnings."""

import io

from rich.console import Console

from tfcompile.report import VariantReport, assign_ids, rank
from tfcompile.report_table import TableCaption, legend, render_table, roofline_line, status_of, warnings_for

LONG = "cleanup+merge_qkv_projections+prune_tokens(keep_ratio=0.8,layers=[2],sim_fraction=0.0)"


def variant(name, ms, *, exact=True, quality=None, flops=1e9, passes=None, eligible=True, rejected=None,
            note=""):
    report = VariantReport(name=name, passes=passes if passes is not None else name.split("+"), exact=exact,
                           predicted_ms={"cpu": ms}, prediction="roofline", flops=flops, bytes=1e6,
                           max_rel_err=1e-7 if exact else None, quality=quality,
                           quality_metric=None if exact else "mean_cosine")
    if not eligible:
        report.reject(rejected, note)
    return report


def measured(report, ms, p10, p90, ratio=(1.0, 1.0, 1.0)):
    report.measured_ms = ms
    report.measured_spread = {"median": ms, "p10": p10, "p90": p90, "low": p10, "high": p90, "runs": 10}
    report.vs_baseline = {"median": ratio[0], "p10": ratio[1], "p90": ratio[2], "low": ratio[1], "high": ratio[2],
                          "runs": 10}
    report.throughput_per_s = 8 / (ms / 1e3)
    report.backend = "ort"
    return report


def ranked_reports():
    reports = [
        variant("baseline", 40.0, passes=[]),
        variant("cleanup", 39.0, passes=["remove_identity_ops", "fold_constants"]),
        variant(LONG, 30.0, exact=False, quality=0.991, flops=8e8),
        # Same predicted cost and quality as LONG minus its first pass: the extra pass changed nothing.
        variant(LONG.replace("cleanup+", ""), 30.0, exact=False, quality=0.991, flops=8e8),
        variant(LONG.replace("0.8", "0.6"), 25.0, exact=False, quality=0.9515, flops=6e8, eligible=False,
                rejected="below budget", note="mean_cosine 0.9515 below budget 0.98"),
        variant("cleanup+structure_ffn(rank_ratio=0.5)", 28.0, exact=False, quality=0.6681, flops=7e8,
                eligible=False, rejected="below budget", note="mean_cosine 0.6681 below budget 0.98"),
        variant("cleanup+merge_qkv_projections", 38.0, eligible=False, rejected="deviates",
                note="exact variant deviates by 3.0e-03 relative: not ranked"),
    ]
    measured(reports[0], 46.0, 45.0, 48.0)
    measured(reports[1], 45.0, 44.0, 47.0, ratio=(0.98, 0.96, 1.01))
    ranked = rank(reports, "cpu")
    assign_ids(ranked, "cpu")
    return ranked


def rendered(reports, *, wide=False, width=80):
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None)
    render_table(reports, "cpu", console, "tiny on cpu",
                 TableCaption("roofline from this host's detected peaks, uncalibrated", "AMD EPYC, 2 cores", 8),
                 wide=wide)
    return buffer.getvalue()


def table_rows(text):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("───"))
    end = next(i for i, line in enumerate(lines) if line.startswith("predicted:"))
    return lines[start + 1:end]


def test_every_row_fits_80_columns_and_is_told_apart():
    reports = ranked_reports()
    text = rendered(reports)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    shown = [r for r in reports if r.folded_into is None]
    # One line per shown variant, each starting with its own id, in rank order.
    assert [row.split()[0] for row in table_rows(text)] == [r.id for r in shown]
    assert len({r.id for r in shown}) == len(shown)
    # The legend names every shown variant's passes in full, so the ids mean something.
    joined = " ".join(text.split())
    assert "prune_tokens(keep_ratio=0.8, layers=[2], sim_fraction=0.0)" in joined


def test_rejected_rows_say_why():
    reports = ranked_reports()
    text = rendered(reports)
    for report in reports:
        if not report.eligible:
            row = next(line for line in table_rows(text) if line.split()[0] == report.id)
            assert report.rejected in row, row
            assert report.note in " ".join(text.split())  # the full reason, in the legend


def test_a_variant_that_changed_nothing_is_folded():
    reports = ranked_reports()
    with_extra = next(r for r in reports if r.name == LONG)
    simpler = next(r for r in reports if r.name == LONG.replace("cleanup+", ""))
    assert with_extra.folded_into == simpler.id and simpler.folded_into is None
    text = rendered(reports)
    assert f"{with_extra.id}: same cost and quality as {simpler.id}" in " ".join(text.split())
    assert with_extra.id in [line.split()[0] for line in rendered(reports, wide=True).splitlines() if line.split()]


def test_status_is_the_rank_or_the_reason():
    reports = ranked_reports()
    statuses = {r.name: status_of(r, reports) for r in reports}
    assert statuses["cleanup"] == "best"  # measured variants rank before predicted-only ones
    assert statuses[LONG.replace("cleanup+", "")] == "#3"
    assert statuses["baseline"] == "baseline"
    assert statuses["cleanup+merge_qkv_projections"] == "deviates"


def test_spread_and_throughput_are_shown():
    text = rendered(ranked_reports())
    assert "p10-p90" in text and "45.0-48.0" in text and "0.98x" in text
    assert "seq/s" in text and "174" in text  # 8 sequences in 46 ms


def test_busy_machine_and_unreliable_speedup_are_warned_about():
    reports = ranked_reports()
    # cleanup measured 0.98x, with run-by-run ratios from 0.96 to 1.01: no claim of a win.
    assert [line.split(":")[0] for line in warnings_for(reports)] == ["v1"]
    noisy = measured(variant("cleanup", 39.0), 45.0, 35.0, 60.0, ratio=(0.97, 0.8, 1.2))
    noisy.id = "v9"
    lines = warnings_for([noisy])
    assert any("looked busy" in line for line in lines)
    assert any("not a reliable difference" in line for line in lines)
    steady = measured(variant("cleanup", 39.0), 45.0, 44.0, 46.0, ratio=(0.8, 0.78, 0.82))
    steady.id = "v2"
    assert warnings_for([steady]) == []


def test_uncalibrated_host_prediction_says_how_far_off_it_was():
    reports = ranked_reports()
    lines = roofline_line(reports, {"kind": "roofline", "backend": "ort"}, "cpu")
    assert len(lines) == 1 and "tfcompile calibrate --target cpu --backend ort" in lines[0]
    assert "base -13%" in lines[0]  # 40 ms predicted, 46 ms measured
    assert roofline_line(reports, {"kind": "calibrated", "backend": "ort"}, "cpu") == []
    assert roofline_line(reports, {"kind": "roofline", "backend": "ort"}, "a100") == []


def test_legend_has_one_entry_per_shown_variant():
    reports = ranked_reports()
    entries = [line for line in legend(reports) if line.split()[0] in {r.id for r in reports}]
    assert len(entries) == sum(1 for r in reports if r.folded_into is None)


def test_brackets_in_names_and_reasons_print_as_written():
    reports = ranked_reports()
    odd = variant("cleanup+remove_padding_runtime", 20.0, eligible=False, rejected="fixed lengths",
                  note="pass remove_padding is written for the traced [batch, seq]")
    odd.id = "v9"
    text = rendered(reports + [odd], wide=True, width=200)
    assert "[batch, seq]" in text and "prune_tokens(keep_ratio=0.8,layers=[2]" in text
