"""The ``tfcompile`` command line: parse, call the library, print.

Errors caused by the user's input are ``TfcompileError``s (or click's own
usage errors): printed as one line on stderr, exit status 2, no traceback, no
output file written. Anything else is a bug in tfcompile: one line and exit
status 1, with the traceback only under ``tfcompile --debug``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from tfcompile.cli_options import (directory_output, file_output, int_list, load_graph, load_options, model_options,
                                   parse_remote, remote_options)
from tfcompile.errors import MAX_SEED, TfcompileError, first_line
from tfcompile.workload import parse_sizes

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130
DEBUG_FLAG = "--debug"

# Piped output (CI logs, files) would otherwise wrap the table at 80 columns.
console = Console(width=None if Console().is_terminal else 140)
err_console = Console(stderr=True)

@click.group()
@click.version_option(package_name="tfcompile")
@click.option(DEBUG_FLAG, is_flag=True, help="Show the traceback of an internal error (for bug reports).")
def cli(debug: bool) -> None:
    """Graph rewrites and hardware cost models for transformer inference."""


@cli.command()
@click.argument("model")
@click.option("--target", "-t", default="cpu", show_default=True, help="Device to rank for (see `tfcompile targets`).")
@click.option("--device-file", "device_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="Your own device as a TOML file shaped like the shipped ones (`tfcompile targets "
                                 "--show cpu`), ranked instead of --target.")
@click.option("--passes", default=None,
              help="Comma-separated pass pipeline to evaluate next to the baseline, instead of searching.")
@click.option("--allow-approx", is_flag=True, help="Search and rank approximate variants that meet --budget.")
@click.option("--budget", default=0.99, show_default=True, type=float,
              help="Minimum quality (cosine or top-1 agreement) for approximate variants.")
@click.option("--lengths", default=None,
              help="Valid lengths of the batch's sequences (padding removal), e.g. 37,128,5.")
@click.option("--lengths-file", "lengths_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="Request lengths the deployment sees (one per line, or LENGTH COUNT lines): "
                                 "batches of --batch requests padded to --seq are the workload.")
@click.option("--measure", is_flag=True, help="Measure the baseline and the best predicted variants on --backend.")
@click.option("--measure-top", default=1, show_default=True, type=int,
              help="How many variants to measure besides the baseline.")
@click.option("--backend", type=click.Choice(["ort", "tvm", "torch"]), default="ort", show_default=True)
@click.option("--repeat", default=10, show_default=True, type=int, help="Timed runs per variant.")
@click.option("--explain", is_flag=True, help="Say for every pass why it applied or not.")
@click.option("--quantize", type=click.Choice(["none", "fp16", "int8"]), default="none", show_default=True,
              help="Lower the exported model's precision with ONNX Runtime's tools (approximate; checked "
                   "against --budget). Meant for edge and npu targets.")
@click.option("--output", "-o", "output_dir", type=click.Path(), default="tfcompile-out", callback=directory_output,
              show_default=True, help="Directory for report.json and model.onnx.")
@remote_options
@model_options
def optimize(model, target, device_file, passes, allow_approx, budget, lengths, lengths_file, measure, measure_top,
             backend, repeat, explain, quantize, output_dir, remote, device_key, **load_kwargs):
    """Search variants of MODEL, verify and predict them, measure the best, rank them."""
    from tfcompile.pipeline import optimize_model
    from tfcompile.report import render_table

    remote_spec, backend = parse_remote(remote, device_key, backend)
    pipeline = tuple(p.strip() for p in passes.split(",") if p.strip()) if passes is not None else None
    if device_file is not None:
        if click.get_current_context().get_parameter_source("target") != click.core.ParameterSource.DEFAULT:
            raise TfcompileError("--device-file names the device to rank; leave out --target")
        from tfcompile.cost_models import device_from_toml

        target = device_from_toml(device_file)

    target_name = target if isinstance(target, str) else target.name

    def show(graph, result) -> None:
        render_table(result.reports, target_name, console, title=f"{graph.name} on {target_name}")
        for report in result.reports:
            for note in report.backend_notes:
                console.print(f"[dim]{report.name}: {note}[/dim]")
        if explain:
            _explain(result)

    batch_sizes = parse_sizes(load_kwargs["batch"], "--batch")
    seq_lens = parse_sizes(load_kwargs["seq"], "--seq")
    load = load_options(**{**load_kwargs, "batch": str(max(batch_sizes)), "seq": str(max(seq_lens))})
    with console.status("loading model") as status:
        outcome = optimize_model(model, output_dir, target=target, backend=backend, passes=pipeline,
                                 batch_sizes=batch_sizes, seq_lens=seq_lens, lengths_file=lengths_file,
                                 allow_approx=allow_approx, budget=budget, measure=measure,
                                 lengths=int_list(lengths, "--lengths") if lengths is not None else None,
                                 measure_top=measure_top, repeat=repeat, quantize=quantize, remote=remote_spec,
                                 load=load, on_ranked=show,
                                 progress=lambda msg: status.update(msg))
    check = outcome.export
    shapes = (f"symbolic {', '.join(check.dims)}" if check.dims
              else f"static at the traced shape ({check.static_reason})")
    console.print(f"model.onnx ({'fp32' if check.exact else check.quantize}): input shapes {shapes}; in ONNX Runtime "
                  f"vs torch at {', '.join(check.checked_at)}: max relative error {check.max_rel_err:.1e}, "
                  f"{check.quality_metric} {check.quality:.5f}")
    console.print(f"best: [bold]{outcome.result.best}[/bold]; wrote {outcome.report_path} and {outcome.onnx_path}")


def _explain(result) -> None:
    from tfcompile.optimize import explain

    table = Table(title="why each pass applied or not")
    for column in ("pass", "in best variant", "reason"):
        table.add_column(column)
    for name, used, reason in explain(result):
        table.add_row(name, "yes" if used else "no", reason)
    console.print(table)


@cli.command()
@click.argument("model")
@click.option("--passes", default="remove_identity_ops,fold_constants,eliminate_dead_code", show_default=True,
              help="Comma-separated passes to apply before export ('' for none).")
@click.option("--output", "-o", "output_path", type=click.Path(), required=True, callback=file_output,
              help="File to write: .onnx for ort, a shared library (.so) for tvm.")
@click.option("--backend", type=click.Choice(["ort", "tvm"]), default="ort", show_default=True,
              help="ort: checked ONNX; tvm: a Relax VM library for this CPU (tuned kernels where a database exists).")
@model_options
def export(model, passes, output_path, backend, **load_kwargs):
    """Apply passes to MODEL and export it as checked ONNX (symbolic batch and sequence where the passes
    allow, checked at several shapes) or as a compiled TVM library (traced shape)."""
    suffixes = {"ort": (".onnx",), "tvm": (".so",)}[backend]
    if output_path.suffix.lower() not in suffixes:
        # A TVM library named model.onnx (or an ONNX file named model.so) fails only in the tool that reads it.
        raise TfcompileError(f"-o {output_path}: --backend {backend} writes a {' or '.join(suffixes)} file; "
                             f"name it so")
    from tfcompile.backends.dynamic_export import export_deployable_onnx, export_variant_onnx
    from tfcompile.errors import BackendError
    from tfcompile.measure import OUTPUT_TOLERANCE
    from tfcompile.variants import build_variant, custom_variant
    from tfcompile.verify import compare_outputs

    with console.status("loading model") as status:
        graph = load_graph(model, **load_kwargs)
        names = [p.strip() for p in passes.split(",") if p.strip()]
        variant = build_variant(graph, custom_variant(names)) if names else None
        if backend == "ort":
            status.update("exporting ONNX")
            deployed = export_variant_onnx(variant, output_path, original=graph) if variant \
                else export_deployable_onnx(graph, output_path)
            for line in deployed.summary():
                console.print(line, soft_wrap=True)
            return
        status.update("compiling with TVM")
        from tfcompile.backends.tvm import compile_graph

        module = compile_graph(variant.graph if variant else graph)
        check = compare_outputs(graph.run(), module.run(graph.example_inputs), graph.output_names)
        if check.max_rel_err > OUTPUT_TOLERANCE:  # checked before anything is written
            raise BackendError(f"the TVM library differs from torch by {check.max_rel_err:.1e} relative; "
                               "nothing written")
        _write_tvm_library(module, output_path)
    console.print(module.schedule_summary())
    shapes = ", ".join("x".join(map(str, t.shape)) for t in graph.example_inputs)
    console.print(f"input shapes: static, {shapes} (a TVM library is compiled for the traced shape)")
    console.print(f"wrote {output_path} (TVM vs torch: max relative error {check.max_rel_err:.1e})")


def _write_tvm_library(module, output_path: Path) -> None:
    from tfcompile.outputs import atomic_path

    with atomic_path(output_path) as tmp:
        # export_library picks the format from the file name's suffix.
        library = tmp.with_suffix(".so")
        try:
            module.executable.export_library(str(library))
            library.replace(tmp)
        finally:
            library.unlink(missing_ok=True)


@cli.command()
@click.option("--target", "-t", default="cpu", show_default=True, help="Only this host (cpu) can be measured here.")
@click.option("--backend", type=click.Choice(["ort", "tvm", "torch"]), default="ort", show_default=True)
@click.option("--repeat", default=10, show_default=True, type=click.IntRange(min=1),
              help="Timed runs per micro-benchmark.")
@click.option("--output", "-o", "output_path", type=click.Path(), default=None, callback=file_output,
              help="Profile file (default: the profile directory, $TFCOMPILE_PROFILE_DIR or ~/.cache/tfcompile).")
@remote_options
def calibrate(target, backend, repeat, output_path, remote, device_key):
    """Measure micro-benchmarks on this host and fit a calibration profile."""
    from tfcompile.cost_models import load_device
    from tfcompile.cost_models.calibration import fit, profile_path, save_profile
    from tfcompile.cost_models.device import detect_host
    from tfcompile.calibrate import default_suite, run_suite
    from tfcompile.outputs import check_output_file

    load_device(target)
    remote_spec, backend = parse_remote(remote, device_key, backend)
    if target != "cpu" and remote_spec is None:
        raise TfcompileError(f"calibrating {target} needs that device; only 'cpu' (this host) is measured here, "
                             "or the device itself through a TVM RPC tracker (--remote HOST:PORT --device-key KEY)")
    check_output_file(output_path or profile_path(target, backend))  # the default file too, before measuring
    suite = default_suite()
    with console.status("calibrating") as status:
        if remote_spec is not None:
            from tfcompile.calibrate import run_suite_remote

            samples = run_suite_remote(suite, remote_spec, repeat=repeat, target_name=target,
                                       progress=lambda m: status.update(f"calibrating {m}"))
            host_label = f"{remote_spec} (TVM RPC)"
        else:
            samples = run_suite(suite, backend, repeat=repeat, progress=lambda m: status.update(f"calibrating {m}"))
            host = detect_host()
            host_label = f"{host.model}, {host.cores} cores"
    profile = fit(samples, target, backend, host=host_label)
    path = save_profile(profile, output_path)
    table = Table(title=f"calibration {target}/{backend}: fit MAPE {profile.fit_mape:.1%}")
    for column in ("micro-benchmark", "measured ms", "fitted ms", "error"):
        table.add_column(column, justify="right" if column != "micro-benchmark" else "left")
    for record in profile.samples:
        m, p = record["measured_s"] * 1e3, record["predicted_s"] * 1e3
        table.add_row(record["name"], f"{m:.4f}", f"{p:.4f}", f"{(p - m) / m:+.0%}")
    console.print(table)
    console.print(f"wrote {path}")


@cli.command()
@click.argument("model")
@click.option("--target", "-t", default="cpu", show_default=True)
@click.option("--backend", type=click.Choice(["ort", "tvm", "torch"]), default="ort", show_default=True)
@click.option("--batches", default="1", show_default=True, help="Comma-separated batch sizes.")
@click.option("--seqs", default="128", show_default=True, help="Comma-separated sequence lengths.")
@click.option("--profile", "profile_path", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Calibration profile (default: the saved one for TARGET/BACKEND).")
@click.option("--repeat", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--passes", "pass_count", default=1, show_default=True, type=click.IntRange(1, 10),
              help="Measure every variant this many times over, keeping each one's lowest median "
                   "(takes out spells of load on a shared host).")
@click.option("--output", "-o", "output_dir", type=click.Path(), default="tfcompile-compare",
              callback=directory_output,
              show_default=True, help="Directory for compare.json and compare.png.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, MAX_SEED))
@remote_options
def compare(model, target, backend, batches, seqs, profile_path, repeat, pass_count, output_dir, seed, remote,
            device_key):
    """Predicted against measured latency for every variant of MODEL."""
    from tfcompile.compare import (builtin_variant_graphs, check_compare_options, lowest_of_passes,
                                   measure_and_predict, score, write_outputs)
    from tfcompile.cost_models.model import cost_model_for

    check_compare_options(target, output_dir)  # an unknown target or an unwritable -o fails before any work
    remote_spec, backend = parse_remote(remote, device_key, backend)
    if target != "cpu" and remote_spec is None:
        raise TfcompileError(f"measuring on {target} needs that device; only 'cpu' (this host) is measured here, "
                             "or the device itself through a TVM RPC tracker (--remote HOST:PORT --device-key KEY)")
    batch_sizes, seq_lens = int_list(batches, "--batches"), int_list(seqs, "--seqs")  # before anything is printed
    cost_model = cost_model_for(target, backend, profile_path=profile_path)
    if cost_model.kind != "calibrated":
        console.print(f"[yellow]no calibration profile for {target}/{backend}: run `tfcompile calibrate --target "
                      f"{target} --backend {backend}`; showing uncalibrated predictions only[/yellow]")
    with console.status("building variants") as status:
        graphs = builtin_variant_graphs(model, batch_sizes, seq_lens, seed)
        rows = lowest_of_passes([
            measure_and_predict(graphs, cost_model=cost_model, repeat=repeat,
                                progress=lambda m, i=i: status.update(f"pass {i + 1}/{pass_count}: {m}"),
                                remote=remote_spec, group_key=lambda graph: graph.name.rsplit(" ", 1)[0])
            for i in range(pass_count)])
    scores = score(rows)
    table = Table(title=f"{model}: predicted vs measured on {target}/{remote_spec.label if remote_spec else backend}")
    table.add_column("variant")
    table.add_column("measured ms", justify="right")
    for predictor in scores:
        table.add_column(f"{predictor} ms", justify="right")
        table.add_column("err", justify="right")
    for row in rows:
        cells = [row.name, f"{row.measured_ms:.3f}"]
        for predictor in scores:
            p = row.predicted_ms[predictor]
            cells += [f"{p:.3f}", f"{(p - row.measured_ms) / row.measured_ms:+.0%}"]
        table.add_row(*cells)
    console.print(table)
    summary = Table(title="scores")
    for column in ("predictor", "MAPE", "within ±10%", "Kendall τ"):
        summary.add_column(column)
    for predictor, s in scores.items():
        summary.add_row(predictor, f"{s['mape']:.1%}", f"{s['within_10pct']:.0%}", f"{s['kendall_tau']:.3f}")
    console.print(summary)
    write_outputs(rows, scores, output_dir, title=f"{model} on {target}/{backend}")
    console.print(f"wrote {output_dir / 'compare.json'} and {output_dir / 'compare.png'}")


@cli.command(name="passes")
def list_passes():
    """List the registered passes."""
    from tfcompile.passes import all_passes

    table = Table(title="passes")
    table.add_column("name")
    table.add_column("exactness")
    table.add_column("what it does")
    for p in all_passes():
        table.add_row(p.name, p.exactness.value, p.description)
    console.print(table)


@cli.command()
@click.option("--show", "show_name", default=None, metavar="NAME",
              help="Print NAME's device file: a template for your own --device-file.")
def targets(show_name):
    """List the device targets the cost model knows."""
    from tfcompile.cost_models import available_targets, load_device

    if show_name is not None:
        from tfcompile.cost_models.device import device_file

        load_device(show_name)  # a known name, never a path
        click.echo(device_file(show_name).read_text(), nl=False)
        return

    table = Table(title="targets")
    for column in ("name", "kind", "device", "fp32 TFLOP/s", "fp16 TFLOP/s", "GB/s"):
        table.add_column(column)
    for name in available_targets():
        d = load_device(name)
        table.add_row(name, d.kind, d.description, f"{d.peak_for('fp32') / 1e12:.3g}",
                      f"{d.peak_for('fp16') / 1e12:.3g}", f"{d.mem_bandwidth_bytes_per_s / 1e9:.0f}")
    console.print(table)


@cli.command()
@click.argument("model")
@click.option("--target", "-t", default="cpu", show_default=True,
              help="Only this host (cpu) can be tuned here; tuning measures every trial.")
@click.option("--trials", default=64, show_default=True, type=click.IntRange(min=1),
              help="Trial budget over all kernels that still need tuning (split evenly, at least 4 each).")
@click.option("--passes", default="remove_identity_ops,fold_constants,eliminate_dead_code", show_default=True,
              help="Passes to apply first: tune the variant you will deploy ('' for none).")
@click.option("--kernels", default=None, help="Comma-separated kernel names to tune (default: all).")
@click.option("--database", "database_root", type=click.Path(path_type=Path), default=None,
              help="Tuning database root (default: $TFCOMPILE_TVM_TUNING_DIR or ~/.cache/tfcompile/tvm-tuning).")
@model_options
def tune(model, target, trials, passes, kernels, database_root, **load_kwargs):
    """MetaSchedule-tune MODEL's TVM kernels for this CPU into a reusable database."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tfcompile.backends.tvm import compile_graph, host_target
    from tfcompile.backends.tvm.tuning import check_tuning_database, tune_graph
    from tfcompile.cost_models import load_device
    from tfcompile.variants import build_variant, custom_variant
    from tfcompile.verify import compare_outputs

    load_device(target)
    if target != "cpu":
        raise TfcompileError(f"tuning {target} needs that device; only 'cpu' (this host) is tuned here")
    if trials < 1:
        raise click.BadParameter("must be at least 1", param_hint="--trials")
    check_tuning_database(host_target(), database_root)  # a damaged database fails before loading
    with console.status("loading model"):
        graph = load_graph(model, **load_kwargs)
        names = [p.strip() for p in passes.split(",") if p.strip()]
        if names:
            graph = build_variant(graph, custom_variant(names)).graph
    chosen = [k.strip() for k in kernels.split(",") if k.strip()] if kernels else None
    columns = (TextColumn("tuning {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("kernels", total=None)

        def progress(kernel: str, done: int, total: int) -> None:
            bar.update(task, description=kernel or "done", completed=done, total=total)

        result = tune_graph(graph, target=host_target(), root=database_root, max_trials=trials, kernels=chosen,
                            trials_per_iter=min(16, max(4, trials)), progress=progress)
    table = Table(title=f"tuning database {result.database}")
    table.add_column("kernel")
    table.add_column("this run")
    table.add_column("records", justify="right")
    table.add_column("rules µs", justify="right")
    table.add_column("best µs", justify="right")
    for kernel, records in result.tuned.items():
        outcome = result.outcomes.get(kernel, {})
        rules_us = f"{outcome['rules_s'] * 1e6:.1f}" if outcome.get("rules_s") else "no rule"
        best_us = f"{outcome['best_s'] * 1e6:.1f}" if outcome.get("best_s") else ""
        how = "tuned (rules kept: no record 5% faster)" if outcome.get("from_rules") else "tuned"
        table.add_row(kernel, how, str(records), rules_us, best_us)
    for kernel in result.reused:
        table.add_row(kernel, "reused (already in the database)", "", "", "")
    for kernel in result.skipped:
        table.add_row(kernel, "not reached by --trials: rules", "", "", "")
    console.print(table)
    console.print(f"{len(result.tuned)} kernels tuned with a budget of {result.trial_budget} trials, "
                  f"{len(result.reused)} reused, in {result.wall_s:.0f} s")
    with console.status("checking the tuned module against torch"):
        module = compile_graph(graph, schedule="tuned", database_dir=database_root)
        check = compare_outputs(graph.run(), module.run(graph.example_inputs), graph.output_names)
    console.print(module.schedule_summary())
    console.print(f"tuned TVM vs torch: max relative error {check.max_rel_err:.1e}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    debug = DEBUG_FLAG in args or os.environ.get("TFCOMPILE_DEBUG") == "1"
    from tfcompile.outputs import private_tempdir

    # torch's own deprecation, raised when it copies a traced graph: not about the user's input, and a second
    # stderr line next to a one-line error.
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    try:
        with private_tempdir():
            cli.main(args=args, prog_name="tfcompile", standalone_mode=False)
    except TfcompileError as exc:
        return _error(str(exc), EXIT_USER_ERROR)
    except click.ClickException as exc:
        # click would print the usage block, a blank line and the error: one line says it all.
        context = getattr(exc, "ctx", None)
        return _error(exc.format_message() + (f" (see `{context.command_path} --help`)" if context else ""),
                      EXIT_USER_ERROR)
    except (click.exceptions.Abort, KeyboardInterrupt):
        return _error("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # a bug, not the input: say so in one line, traceback on request
        if debug:
            raise
        return _error(f"internal error: {type(exc).__name__}: {first_line(exc)} (a bug in tfcompile, not in your "
                      f"input; rerun as `tfcompile {DEBUG_FLAG} ...` for the traceback and report it)",
                      EXIT_INTERNAL_ERROR)
    return 0


def _error(message: str, status: int) -> int:
    one_line = " ".join(message.split())  # messages quoting torch or a file may carry newlines
    err_console.print(f"error: {one_line}", markup=False, highlight=False, soft_wrap=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
