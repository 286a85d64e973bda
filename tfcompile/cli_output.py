"""What the commands print: tables and summary lines, laid out for an 80-column terminal.

The commands in ``cli`` parse and call the library; the figures they get back
are printed here, so each command's body stays about what it does.
"""

from __future__ import annotations


from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text


def silent_console() -> Console:
    return Console(quiet=True, width=80)


def show_ranked(graph, result, target_name: str, out: Console, *, wide: bool, remote) -> None:
    from tfcompile.report_table import TableCaption, render_table, roofline_line

    runtime = next((r.backend for r in result.reports if r.measured_ms is not None), None)
    host = None
    if runtime is not None:
        from tfcompile.provenance import host_line

        host = f"{runtime} ({remote})" if remote is not None else f"{runtime} on {host_line()}"
        if remote is None and " cuda " in f" {runtime} ":
            import torch

            host = f"{runtime} on {torch.cuda.get_device_name()}"
    batch = int(graph.example_inputs[0].shape[0]) if graph.example_inputs and graph.example_inputs[0].dim() else None
    caption = TableCaption(prediction=result.prediction.get("text", ""), host=host, batch=batch)
    render_table(result.reports, target_name, out, title=f"{graph.name} on {target_name}", caption=caption,
                 wide=wide)
    for line in roofline_line(result.reports, result.prediction, target_name):
        out.print(line, style="yellow", highlight=False, markup=False)
    for report in result.reports:
        for note in report.backend_notes:
            out.print(f"{report.id}: {note}", style="dim", markup=False)


def show_explanation(result, out: Console) -> None:
    from tfcompile.optimize import explain

    table = Table(title="why each pass applied or not", box=box.SIMPLE_HEAD, show_edge=False)
    for column in ("pass", "in best variant", "reason"):
        table.add_column(column)
    for name, used, reason in explain(result):
        table.add_row(name, "yes" if used else "no", Text(reason))
    out.print(table)


def show_outcome(outcome, out: Console) -> None:
    """optimize's last lines: how model.onnx was exported and checked, the best variant, the files written."""
    check = outcome.export
    shapes = (f"symbolic {', '.join(check.dims)}" if check.dims
              else f"static at the traced shape ({check.static_reason})")
    out.print(f"model.onnx ({check.precision}): input shapes {shapes}; in ONNX Runtime "
              f"vs torch at {', '.join(check.checked_at)}: max relative error {check.max_rel_err:.1e}, "
              f"{check.quality_metric} {check.quality:.5f}", markup=False)
    for report in outcome.result.reports:
        if report.rejected == "not lowered":
            out.print(f"{report.id} {report.name}: {report.note}; the next best was written", markup=False,
                      highlight=False, style="yellow")
    best = next(r for r in outcome.result.reports if r.name == outcome.result.best)
    # Names, reasons and paths are text, not markup: "[batch, seq]" or a path with brackets must print as is.
    out.print(f"best: [bold]{best.id}[/bold] {escape(best.name)}; wrote {escape(str(outcome.report_path))} and "
              f"{escape(str(outcome.onnx_path))}",
              highlight=False)


def show_profile(profile, out: Console) -> None:
    """calibrate's fit: every micro-benchmark measured against the fitted profile."""
    runtime = "".join(f" {value}" for value in profile.torch_options.values())  # " cuda graphs bf16"
    where = f" on {profile.gpu_name}" if profile.gpu_name else ""
    table = Table(title=f"calibration {profile.target}/{profile.backend}{runtime}{where}: fit MAPE "
                        f"{profile.fit_mape:.1%}",
                  box=box.SIMPLE_HEAD, show_edge=False)
    for column in ("micro-benchmark", "measured ms", "fitted ms", "error"):
        table.add_column(column, justify="right" if column != "micro-benchmark" else "left")
    for record in profile.samples:
        m, p = record["measured_s"] * 1e3, record["predicted_s"] * 1e3
        table.add_row(record["name"], f"{m:.4f}", f"{p:.4f}", f"{(p - m) / m:+.0%}")
    out.print(table)
    if profile.heldout_roofline_mape:
        out.print(f"held out (every 4th micro-benchmark, fitted without them): calibrated MAPE "
                  f"{profile.heldout_mape:.1%}, roofline {profile.heldout_roofline_mape:.1%}", markup=False)


def show_comparison(rows, scores: dict, out: Console, *, title: str) -> None:
    """compare's rows (measured and each predictor's figure with its error) and the predictors' scores; rows
    under the plot's short labels ("v1 8x128"), with the key under the table."""
    from tfcompile.compare import row_labels

    labels, key = row_labels(rows)
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("variant", no_wrap=True)
    table.add_column("measured ms", justify="right")
    for predictor in scores:
        table.add_column(f"{predictor} ms", justify="right")
        table.add_column("err", justify="right")
    for row, label in zip(rows, labels):
        cells = [Text(label), f"{row.measured_ms:.3f}"]
        for predictor in scores:
            p = row.predicted_ms[predictor]
            cells += [f"{p:.3f}", f"{(p - row.measured_ms) / row.measured_ms:+.0%}"]
        table.add_row(*cells)
    out.print(table)
    for short, variant in key.items():
        out.print(f"{short:>4}  {variant}", highlight=False, markup=False)
    summary = Table(title="scores", box=box.SIMPLE_HEAD, show_edge=False)
    for column in ("predictor", "MAPE", "within ±10%", "Kendall τ"):
        summary.add_column(column)
    for predictor, s in scores.items():
        summary.add_row(predictor, f"{s['mape']:.1%}", f"{s['within_10pct']:.0%}", f"{s['kendall_tau']:.3f}")
    out.print(summary)
    from tfcompile.compare import speedup_scores

    ids = dict(zip((r.name for r in rows), labels))
    for predictor, s in speedup_scores(rows).items():
        worst = s["worst"]
        out.print(f"{predictor}: speed-up over the baseline off by {s['median_error_pp']:.1f} points (median of "
                  f"{s['variants']}); furthest off {ids[worst['variant']]}: predicted "
                  f"{worst['predicted_speedup']:.2f}x, measured {worst['measured_speedup']:.2f}x",
                  highlight=False, markup=False)


def show_host_speed(run, out: Console) -> None:
    """How fast the host ran around compare's measurement (``compare_run.CompareRun``): the probe's clause, and
    the calibration's own layers' factor with the calibrated scores at calibration speed."""
    from tfcompile.cost_models.host_speed import speed_text

    if run.host_speed and speed_text(run.host_speed):
        out.print(speed_text(run.host_speed), markup=False)
    if not run.reference_speed:
        return
    steadied = (run.scores_at_calibration_speed or {}).get("calibrated")
    line = (f"calibration's own layers ran at {run.reference_speed['factor']:.2f}x of their calibration speed "
            "around the measurement (timed just before and after it)")
    if steadied:
        line += (f"; with the measured times at calibration speed, calibrated MAPE {steadied['mape']:.1%}, "
                 f"{steadied['within_10pct']:.0%} within ±10 %")
    out.print(line, highlight=False, markup=False)


def warn_uncalibrated(out: Console, target: str, backend: str, torch_options: dict[str, str]) -> None:
    """compare without a profile for the target and runtime: how to make one, and that only the roofline shows."""
    options = "".join(f" --{key} {value}" for key, value in torch_options.items())
    runtime = " ".join([backend, *torch_options.values()])
    out.print(f"[yellow]no calibration profile for {target}/{runtime}: run `tfcompile calibrate --target {target} "
              f"--backend {backend}{options}`; showing uncalibrated predictions only[/yellow]")


def show_explanations(explained, out: Console) -> None:
    """compare --explain-ops: per variant furthest off, its predicted and profiled milliseconds per group of ops."""
    if not explained:
        return
    from tfcompile.cost_models.attribution import GROUPS
    from tfcompile.explain import groups_off_ms

    for e in explained:
        table = Table(title=f"{e.variant}: where the {e.predictor} prediction is off ({e.profiled_by}, "
                            f"{e.profiled_run_ms:.2f} ms a run)", box=box.SIMPLE_HEAD, show_edge=False)
        for column in ("group of ops", "predicted ms", "measured ms", "off ms"):
            table.add_column(column, justify="left" if column == "group of ops" else "right")
        for group in GROUPS:
            predicted, measured = e.predicted_ms[group], e.measured_ms[group]
            table.add_row(group, f"{predicted:.2f}", f"{measured:.2f}", f"{predicted - measured:+.2f}")
        out.print(table)
    off = groups_off_ms(explained)
    out.print("furthest off over these variants: " + "; ".join(
        f"{group} {ms:+.1f} ms" for group, ms in list(off.items())[:3]) + " (predicted less measured)",
        highlight=False, markup=False)


def optimize_generation(model, output_dir, out: Console, *, target: str, backend: str, prompt_len: int,
                        new_tokens: int, measure: bool, measure_top: int, repeat: int, load_kwargs: dict):
    """``optimize --generate``: run it, print the ranked table as soon as it exists, then the files written."""
    from tfcompile.cli_options import load_options, parse_one_size
    from tfcompile.generation.pipeline import optimize_generation_model
    from tfcompile.provenance import host_line
    from tfcompile.report_generation import show_generation

    batch = parse_one_size(load_kwargs["batch"], "--batch")
    load = load_options(**load_kwargs)
    host = f"{backend} on {host_line()}" if measure else None
    with out.status("loading model") as status:
        outcome = optimize_generation_model(
            model, output_dir, prompt_len=prompt_len, new_tokens=new_tokens, batch=batch, target=target,
            backend=backend, measure=measure, measure_top=measure_top, repeat=repeat, load=load,
            on_ranked=lambda result: show_generation(result, target, out, host=host),
            progress=lambda msg: status.update(msg))
    best = next(r for r in outcome.result.reports if r.name == outcome.result.best)
    out.print(f"best: {best.id} {best.name}", markup=False, highlight=False)
    out.print(f"prefill.onnx and decode.onnx: greedy tokens in ONNX Runtime identical to the original's "
              f"({outcome.export['checked']})", markup=False, highlight=False)
    out.print(f"wrote {outcome.onnx_paths[0]}, {outcome.onnx_paths[1]}, {outcome.report_path}", markup=False,
              highlight=False)
    return outcome
