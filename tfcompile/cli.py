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

from tfcompile import cli_output
from tfcompile.cli_options import (check_generation_options, device_options, directory_output, file_output,
                                   generation_options, int_list, load_graph, load_options, model_argument,
                                   model_options, parse_remote, remote_options, run_config_defaults)
from tfcompile.errors import MAX_SEED, TfcompileError, first_line
from tfcompile.workload import parse_sizes

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130
DEBUG_FLAG = "--debug"

# The terminal's width; piped, $COLUMNS or 80 (rich's defaults): tables are laid out to fit 80 columns.
console = Console()
err_console = Console(stderr=True)

EXIT_CODES = ("Exit status: 0 done; 2 the input or an option is wrong (one line on stderr, nothing written, "
              "earlier output untouched); 1 a bug in tfcompile (one line; --debug shows the traceback); "
              "130 interrupted.")


@click.group(epilog=EXIT_CODES)
@click.version_option(package_name="tfcompile")
@click.option(DEBUG_FLAG, is_flag=True, help="Show the traceback of an internal error (for bug reports).")
@click.option("--verbose", is_flag=True, envvar="TFCOMPILE_VERBOSE", help="Also show torch and TVM warnings and logs.")
@click.option("--run-config", "run_config", type=click.Path(path_type=Path), default=None, metavar="FILE.toml",
              help="Options for a whole run from a TOML file: a table per command ([optimize] target = \"cpu\", "
                   "batch = [1, 8], allow-approx = true, model = \"minilm\"); the command line wins.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool, run_config: Path | None) -> None:
    """Graph rewrites and hardware cost models for transformer inference."""
    if run_config is not None:
        ctx.default_map = run_config_defaults(run_config, cli.commands)
    if verbose:
        os.environ["TFCOMPILE_VERBOSE"] = "1"  # read by the TVM backend's log filter (backends/tvm/native_log.py)
    else:  # torch's own deprecation when it copies a traced graph: a second stderr line, nothing to act on
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)


@cli.command()
@model_argument
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
@click.option("--calibration-data", "calibration_data", type=click.Path(path_type=Path), default=None,
              help="Plain-text sentences, one per line (UTF-8, at most 4 MiB), to judge approximate variants on: "
                   "even lines choose the token schedules, odd lines are held out for the reported quality. "
                   "Default: corpus passages (sentence encoders). Needs --allow-approx.")
@click.option("--measure", is_flag=True, help="Measure the baseline and the best predicted variants on --backend.")
@click.option("--measure-top", default=1, show_default=True, type=int,
              help="How many variants to measure besides the baseline.")
@click.option("--backend", type=click.Choice(["ort", "tvm", "torch"]), default="ort", show_default=True,
              help="Runtime that measures (--measure) and whose fusion the cost model assumes: ONNX Runtime, TVM "
                   "Relax (this CPU), or torch eager.")
@click.option("--repeat", default=10, show_default=True, type=int, help="Timed runs per variant.")
@click.option("--time-budget", "time_budget_s", default=None, type=float, metavar="SECONDS",
              help="Stop timing once this many seconds are spent (at least 3 runs per variant).")
@click.option("--explain", is_flag=True, help="Say for every pass why it applied or not.")
@click.option("--wide", is_flag=True, help="Put every variant's passes and knobs in the table, and show variants "
                                           "that changed nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json on stdout instead of the table.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors (for scripts; read report.json).")
@click.option("--quantize", type=click.Choice(["none", "fp16", "int8"]), default="none", show_default=True,
              help="Lower the exported model's precision with ONNX Runtime's tools (approximate; checked "
                   "against --budget). Meant for edge and npu targets.")
@click.option("--output", "-o", "output_dir", type=click.Path(), default="tfcompile-out", callback=directory_output,
              show_default=True, help="Directory for report.json and model.onnx.")
@generation_options
@remote_options
@device_options
@model_options
def optimize(model, target, device_file, passes, allow_approx, budget, lengths, lengths_file, calibration_data,
             measure, measure_top,
             backend, repeat, time_budget_s, explain, wide, as_json, quiet, quantize, output_dir, remote, device_key,
             generate, prompt_len, new_tokens, torch_options, **load_kwargs):
    """Search variants of MODEL, verify and predict them, measure the best, rank them.

    MODEL: a zoo name (gpt2-small, bert-base, vit-base, llama-tiny, minilm, tiny-decoder), a Hugging Face model
    directory (config.json and safetensors weights) or hub id already in the local Hugging Face cache (NAME or
    ORG/NAME; nothing is downloaded), an ONNX file, a torch.export archive (.pt2), or module:factory. Writes
    report.json (schema: report.schema.json in the package) and model.onnx to --output.
    """
    from tfcompile.cost_models import load_device
    if device_file is None:
        load_device(target)  # an unknown --target fails at once, before the imports below load torch
    check_generation_options(generate)
    out = cli_output.silent_console() if quiet or as_json else console
    if generate:
        outcome = cli_output.optimize_generation(model, output_dir, out, target=target, backend=backend,
                                                 prompt_len=prompt_len, new_tokens=new_tokens, measure=measure,
                                                 measure_top=measure_top, repeat=repeat, load_kwargs=load_kwargs)
        if as_json:
            click.echo(outcome.report_path.read_text(), nl=False)
        return

    from tfcompile.pipeline import optimize_model

    remote_spec, backend = parse_remote(remote, device_key, backend)
    pipeline = tuple(p.strip() for p in passes.split(",") if p.strip()) if passes is not None else None
    if device_file is not None:
        if click.get_current_context().get_parameter_source("target") != click.core.ParameterSource.DEFAULT:
            raise TfcompileError("--device-file names the device to rank; leave out --target")
        from tfcompile.cost_models import device_from_toml

        target = device_from_toml(device_file)

    target_name = target if isinstance(target, str) else target.name


    def show(graph, result) -> None:
        cli_output.show_ranked(graph, result, target_name, out, wide=wide, remote=remote_spec)
        if explain:
            cli_output.show_explanation(result, out)

    batch_sizes = parse_sizes(load_kwargs["batch"], "--batch")
    seq_lens = parse_sizes(load_kwargs["seq"], "--seq")
    load = load_options(**{**load_kwargs, "batch": str(max(batch_sizes)), "seq": str(max(seq_lens))})
    with out.status("loading model") as status:
        outcome = optimize_model(model, output_dir, target=target, backend=backend, passes=pipeline,
                                 batch_sizes=batch_sizes, seq_lens=seq_lens, lengths_file=lengths_file,
                                 allow_approx=allow_approx, budget=budget, measure=measure,
                                 lengths=int_list(lengths, "--lengths") if lengths is not None else None,
                                 measure_top=measure_top, repeat=repeat, measure_budget_s=time_budget_s,
                                 calibration_data=calibration_data,
                                 quantize=quantize, remote=remote_spec, load=load, on_ranked=show,
                                 torch_options=torch_options, progress=lambda msg: status.update(msg))
    if as_json:
        click.echo(outcome.report_path.read_text(), nl=False)
        return
    cli_output.show_outcome(outcome, out)


@cli.command()
@model_argument
@click.option("--passes", default="remove_identity_ops,fold_constants,eliminate_dead_code", show_default=True,
              help="Comma-separated passes to apply before export ('' for none).")
@click.option("--output", "-o", "output_path", type=click.Path(), required=True, callback=file_output,
              help="File to write: .onnx for ort, a shared library (.so) for tvm.")
@click.option("--backend", type=click.Choice(["ort", "tvm"]), default="ort", show_default=True,
              help="ort: checked ONNX; tvm: a Relax VM library for this CPU (tuned kernels where a database exists).")
@click.option("--opset", type=click.IntRange(14, 23), default=None,
              help="ONNX opset to export to (default: the exporter's own).")
@click.option("--atol", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Largest absolute difference from torch allowed at every checked shape (default: 1e-4 of the "
                   "largest output magnitude).")
@model_options
def export(model, passes, output_path, backend, opset, atol, **load_kwargs):
    """Apply passes to MODEL and export it as checked ONNX (symbolic batch and sequence where the passes
    allow, checked at several shapes) or as a compiled TVM library (traced shape)."""
    if backend == "tvm" and (opset is not None or atol is not None):
        raise TfcompileError("--opset and --atol are for --backend ort (ONNX); a TVM library is checked against "
                             "torch at 1e-4 relative")
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
            deployed = export_variant_onnx(variant, output_path, original=graph, opset=opset, atol=atol) \
                if variant else export_deployable_onnx(graph, output_path, opset=opset, atol=atol)
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
@click.option("--target", "-t", default="cpu", show_default=True,
              help="Only this host (cpu) is measured here, or a GPU target (h100, a100) with --device cuda.")
@click.option("--backend", type=click.Choice(["ort", "tvm", "torch"]), default="ort", show_default=True,
              help="Runtime the profile is fitted for.")
@click.option("--repeat", default=10, show_default=True, type=click.IntRange(min=1),
              help="Timed runs per micro-benchmark.")
@click.option("--output", "-o", "output_path", type=click.Path(), default=None, callback=file_output,
              help="Profile file (default: the profile directory, $TFCOMPILE_PROFILE_DIR or ~/.cache/tfcompile).")
@remote_options
@device_options
def calibrate(target, backend, repeat, output_path, remote, device_key, torch_options):
    """Measure micro-benchmarks on this host (or its GPU) and fit a calibration profile."""
    from tfcompile.cost_models import load_device
    load_device(target)  # an unknown --target fails at once, before the imports below load torch

    from tfcompile.cost_models.calibration import fit_checked, improves_on_roofline, profile_path, save_profile
    from tfcompile.calibrate import calibrate_here, default_suite
    from tfcompile.outputs import check_output_file

    remote_spec, backend = parse_remote(remote, device_key, backend)
    if target != "cpu" and remote_spec is None and torch_options.get("device") != "cuda":
        raise TfcompileError(f"calibrating {target} needs that device; only 'cpu' (this host) is measured here, "
                             "the device itself through a TVM RPC tracker (--remote HOST:PORT --device-key KEY), "
                             "or its GPU here with --backend torch --device cuda")
    check_output_file(output_path or profile_path(target, backend, torch_options))  # before measuring
    with console.status("calibrating") as status:
        progress = lambda m: status.update(f"calibrating {m}")  # noqa: E731
        if torch_options:
            from tfcompile.calibrate_device import calibrate_torch

            profile, run = calibrate_torch(target, torch_options, repeat=repeat, progress=progress)
            for name, why in run.skipped.items():
                console.print(f"skipped {name}: {why}", style="yellow", markup=False)
        elif remote_spec is not None:
            from tfcompile.calibrate import run_suite_remote

            suite = default_suite(load_device(target).cache_bytes)  # the remote device's cache, not this host's
            samples = run_suite_remote(suite, remote_spec, repeat=repeat, target_name=target, progress=progress)
            profile = fit_checked(samples, target, backend, host=f"{remote_spec} (TVM RPC)")
        else:
            profile = calibrate_here(backend, target, repeat=repeat, progress=progress)
    cli_output.show_profile(profile, console)
    if not improves_on_roofline(profile):
        console.print("not saved: on held-out micro-benchmarks the fit is worse than the roofline it refines; "
                      f"the roofline stays in use for {target}/{backend}", style="yellow", markup=False)
        return
    console.print(f"wrote {save_profile(profile, output_path)}")


@cli.command()
@model_argument
@click.option("--target", "-t", default="cpu", show_default=True, help="Device whose predictions are compared "
              "(only this host, cpu, is measured here unless --remote).")
@click.option("--backend", type=click.Choice(["ort", "tvm", "torch"]), default="ort", show_default=True,
              help="Runtime that measures.")
@click.option("--batches", default="1", show_default=True, help="Comma-separated batch sizes.")
@click.option("--seqs", default="128", show_default=True, help="Comma-separated sequence lengths.")
@click.option("--profile", "profile_path", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Calibration profile (default: the saved one for TARGET/BACKEND and the torch options).")
@click.option("--repeat", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--rounds", "pass_count", default=1, show_default=True, type=click.IntRange(1, 10),
              help="Measure every variant this many rounds over, keeping each one's lowest median "
                   "(takes out spells of load on a shared host).")
@click.option("--output", "-o", "output_dir", type=click.Path(), default="tfcompile-compare",
              callback=directory_output,
              show_default=True, help="Directory for compare.json and compare.png.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, MAX_SEED))
@click.option("--explain-ops", "explain_count", default=None, type=click.IntRange(min=0), metavar="N",
              help="Profile the N variants furthest off on their runtime and split their predicted and measured time "
                   "per group of ops (weight matmuls, attention, norms, ...) [default: 3 with --backend ort or tvm].")
@remote_options
@device_options
def compare(model, target, backend, batches, seqs, profile_path, repeat, pass_count, output_dir, seed, explain_count,
            remote, device_key, torch_options):
    """Predicted against measured latency for every variant of MODEL."""
    from tfcompile.cost_models import load_device
    load_device(target)  # an unknown --target fails at once, before the imports below load torch

    from tfcompile.compare import builtin_variant_graphs, check_compare_options, write_outputs
    from tfcompile.compare_run import run_compare
    from tfcompile.measure import require_measurable
    from tfcompile.cost_models.model import cost_model_for
    from tfcompile.explain import explain, explained_count

    check_compare_options(target, output_dir)  # an unknown target or an unwritable -o fails before any work
    remote_spec, backend = parse_remote(remote, device_key, backend)
    explain_count = explained_count(backend, explain_count)
    require_measurable(target, remote_spec, on_cuda=torch_options.get("device") == "cuda")
    runtime = " ".join([backend, *torch_options.values()])  # "torch cuda graphs bf16"
    batch_sizes, seq_lens = int_list(batches, "--batches"), int_list(seqs, "--seqs")  # before anything is printed
    # The profile fitted with these torch options (device, mode, precision; on cuda, on this GPU), or none.
    cost_model = cost_model_for(target, backend, profile_path=profile_path, torch_options=torch_options)
    if cost_model.kind != "calibrated":
        cli_output.warn_uncalibrated(console, target, backend, torch_options)
    on_this_host = remote_spec is None and torch_options.get("device") != "cuda"
    with console.status("building variants") as status:
        graphs = builtin_variant_graphs(model, batch_sizes, seq_lens, seed)
        run = run_compare(graphs, cost_model, repeat=repeat, pass_count=pass_count,
                          on_this_host=on_this_host, remote=remote_spec, torch_options=torch_options,
                          progress=status.update)
    cli_output.show_comparison(run.rows, run.scores, console,
                               title=f"{Path(model).name}: predicted vs measured on {target}/"
                                     f"{remote_spec.label if remote_spec else runtime}")
    cli_output.show_host_speed(run, console)
    with console.status(f"profiling the {explain_count} variants furthest off on {backend}"):
        explained = explain(run.rows, {g.name: g for g in graphs}, cost_model, count=explain_count)
    cli_output.show_explanations(explained, console)
    write_outputs(run.rows, run.scores, output_dir, title=f"{Path(model).name} on {target} ({runtime})",
                  measured_with=torch_options and {"backend": backend, **torch_options},
                  host_readings=run.host_readings, explained=explained)
    console.print(f"wrote {output_dir / 'compare.json'} and {output_dir / 'compare.png'}")


@cli.command(name="passes")
def list_passes():
    """List the registered passes."""
    import json
    from importlib import resources

    catalog = resources.files("tfcompile") / "passes" / "catalog" / "passes.json"  # the registry as data: no torch
    table = Table(title="passes")
    table.add_column("name")
    table.add_column("exactness")
    table.add_column("what it does")
    for p in json.loads(catalog.read_text(encoding="utf-8")):
        table.add_row(p["name"], p["exactness"], p["description"])
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
@model_argument
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
    from tfcompile.cost_models import load_device
    load_device(target)  # an unknown --target fails at once, before the imports below load torch

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tfcompile.backends.tvm import compile_graph, host_target
    from tfcompile.backends.tvm.tuning import check_tuning_database, tune_graph
    from tfcompile.variants import build_variant, custom_variant
    from tfcompile.verify import compare_outputs

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
    from tfcompile.environment import restored_environ
    from tfcompile.outputs import private_tempdir

    try:
        # `cli` may set TFCOMPILE_VERBOSE and warnings filters: they last for one command.
        with private_tempdir(), warnings.catch_warnings(), restored_environ("TFCOMPILE_VERBOSE"):
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
