"""The whole of ``tfcompile optimize`` as one library call.

``optimize_model(model, output_dir, ...)`` loads the model, prepares the
workload, searches, verifies, predicts and (optionally) measures variants,
then exports the best as a checked ``model.onnx`` (quantized on request) and
writes ``report.json``. The CLI parses arguments, calls this and prints; a
library user gets the same files from the same code::

    import tfcompile
    outcome = tfcompile.optimize_model("gpt2-small", "out/demo", target="cpu", measure=True)
    print(outcome.result.best)

Nothing is written unless every step succeeds: the export is checked before
it replaces ``model.onnx``, and ``model.onnx`` and ``report.json`` replace the
earlier pair together, after both are complete (a failure or Ctrl-C leaves the
earlier pair as it was). Every argument is checked by type and range before
the model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from pathlib import Path
from typing import Any, Callable

from tfcompile import plots
from tfcompile.backends.runner import BACKENDS
from tfcompile.cost_models.device import DeviceSpec
from tfcompile.errors import InvalidOptionError, TfcompileError
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.graph import ModelGraph
from tfcompile.optimize import OptimizeResult, OptimizeSettings, optimize
from tfcompile.outputs import atomic_paths, check_output_dir, in_private_tempdir
from tfcompile.passes import Workload, check_pipeline, get_pass
from tfcompile.provenance import host_record, versions
from tfcompile.report import write_report
from tfcompile.workload import from_distribution as workload_from_distribution
from tfcompile.workload import grid as workload_grid
from tfcompile.workload import read_lengths_file
from tfcompile.workload_cost import check_traced_shape

QUANTIZE_MODES = ("none", "fp16", "int8")


@dataclasses.dataclass
class ExportCheck:
    """How the written model.onnx compares with the torch original."""

    quantize: str
    max_abs_err: float
    max_rel_err: float
    quality: float
    quality_metric: str
    # Symbolic dimensions of the file's inputs in words (e.g. "batch 1..", "seq 1..512"); () when static.
    dims: tuple[str, ...] = ()
    static_reason: str | None = None  # why the file takes only the traced shape
    checked_at: tuple[str, ...] = ()  # the input shapes ONNX Runtime was checked against torch at
    # The narrowest arithmetic in the file: the variant's own (a precision pass) or --quantize's.
    precision: str = "fp32"

    @property
    def exact(self) -> bool:
        return self.quantize == "none"

    def as_dict(self) -> dict[str, Any]:
        return {"quantize": self.quantize, "precision": self.precision, "exact": self.exact,
                "max_abs_err": self.max_abs_err, "max_rel_err": self.max_rel_err, "quality": self.quality,
                "quality_metric": self.quality_metric,
                "dynamic_dims": list(self.dims), "static_reason": self.static_reason,
                "checked_at": list(self.checked_at)}


@dataclasses.dataclass
class OptimizeOutcome:
    result: OptimizeResult
    graph: ModelGraph  # the loaded original, prepared for the workload
    export: ExportCheck
    report_path: Path
    onnx_path: Path


@in_private_tempdir  # libraries' caches and tfcompile's work folders are removed whatever happens
def optimize_model(model: str | os.PathLike, output_dir: Path | str, *, target: str | DeviceSpec = "cpu",
                   backend: str = "ort",
                   passes: tuple[str, ...] | None = None, allow_approx: bool = False, budget: float = 0.99,
                   lengths: tuple[int, ...] | None = None, measure: bool = False, measure_top: int = 1,
                   repeat: int = 10, quantize: str = "none", remote=None, load: LoadOptions = LoadOptions(),
                   batch_sizes: list[int] | None = None, seq_lens: list[int] | None = None,
                   lengths_file: str | os.PathLike | None = None, measure_budget_s: float | None = None,
                   calibration_data: str | os.PathLike | None = None,
                   torch_options: dict[str, str] | None = None,
                   on_ranked: Callable[[ModelGraph, OptimizeResult], None] = lambda graph, result: None,
                   progress: Callable[[str], None] = lambda _: None) -> OptimizeOutcome:
    """Everything ``tfcompile optimize MODEL -o OUTPUT_DIR`` does; see the module docstring.

    ``on_ranked(graph, result)`` sees the loaded model and the ranked result
    before anything is exported (the CLI prints its table there, so it shows
    even when no variant is eligible).

    ``target`` is a shipped target's name or a ``DeviceSpec`` (a user's own
    device file, read with ``tfcompile.cost_models.device_from_toml``).

    A workload of several batch shapes: ``batch_sizes`` and ``seq_lens`` (every
    combination; the model is traced at the largest), or ``lengths_file`` (a
    request-length distribution, batched ``batch_sizes`` at a time and padded
    to ``load.seq``); see ``tfcompile.workload``.
    """
    torch_options = dict(torch_options or {})
    _check_arguments(model, output_dir, target=target, backend=backend, passes=passes, allow_approx=allow_approx,
                     budget=budget, lengths=lengths, measure=measure, measure_top=measure_top, repeat=repeat,
                     quantize=quantize, remote=remote, load=load, torch_options=torch_options)
    output_dir = Path(output_dir)
    calibration_text = None
    if calibration_data is not None:
        if not allow_approx:
            raise InvalidOptionError("--calibration-data judges approximate variants: give --allow-approx too")
        from tfcompile.corpus import read_calibration_file

        calibration_text = tuple(read_calibration_file(calibration_data))  # checked before the model loads
    workload, load = _workload(lengths, batch_sizes, seq_lens, lengths_file, load)
    device = target if isinstance(target, DeviceSpec) else None
    target = device.name if device else target
    settings = OptimizeSettings(target=target, device=device, pipeline=tuple(passes) if passes is not None else None,
                                allow_approx=allow_approx, budget=budget, measure=measure, measure_top=measure_top,
                                backend=backend, repeat=repeat, workload=workload, remote=remote,
                                measure_budget_s=measure_budget_s, calibration_text=calibration_text,
                                torch_options=torch_options)
    _check_settings(settings, load, output_dir)
    progress("loading model")
    graph = load_model(os.fspath(model), load)
    if settings.workload.scenarios:
        check_traced_shape(graph, load.batch, load.seq)
    if settings.workload.lengths:
        from tfcompile.passes.padding import with_lengths

        # The baseline runs the padded batch those lengths describe; variants are checked at valid positions.
        graph = with_lengths(graph, list(settings.workload.lengths))
    result = optimize(graph, settings, progress=progress,
                      load_at=lambda batch, seq: load_model(os.fspath(model), dataclasses.replace(load, batch=batch,
                                                                                                  seq=seq)))
    try:
        on_ranked(graph, result)
        if result.best is None:
            raise TfcompileError("no variant is eligible; nothing written")
        progress(f"writing {output_dir}")
        # All files or none: a failure (or Ctrl-C) before the end leaves the earlier set as it was.
        figures = _figures(result, graph.name, target=target, backend=backend, budget=budget,
                           shapes=_shapes(settings.workload, load), measure=measure, allow_approx=allow_approx)
        finals = [output_dir / "model.onnx", output_dir / "report.json", output_dir / RUN_FILE_NAME] + \
            [output_dir / name for name in figures]
        with atomic_paths(*finals) as (onnx_tmp, report_tmp, run_tmp, *figure_tmps):
            for build, figure_tmp in zip(figures.values(), figure_tmps):
                plots.save(build(), figure_tmp)
            run_tmp.write_text(run_file_text(
                model, target=None if device is not None else target, backend=backend, passes=passes,
                allow_approx=allow_approx, budget=budget, lengths=lengths, lengths_file=lengths_file,
                calibration_data=calibration_data, measure=measure, measure_top=measure_top, repeat=repeat,
                measure_budget_s=measure_budget_s, quantize=quantize, batch_sizes=batch_sizes or [load.batch],
                seq_lens=seq_lens or [load.seq], load=load, output_dir=output_dir, torch_options=torch_options))
            export = _export_first_that_lowers(result, graph, quantize, budget, onnx_tmp, settings.context(),
                                               progress)
            report_settings = {"batch": load.batch, "seq": load.seq, "backend": backend if measure else None,
                               **({"remote": str(remote)} if remote is not None else {}),
                               "allow_approx": allow_approx, "budget": budget, "repeat": repeat,
                               "lengths": list(settings.workload.lengths) if settings.workload.lengths else None,
                               **({"workload": _workload_record(settings.workload)}
                                  if settings.workload.scenarios else {}),
                               **({"quality_data": result.quality_data} if result.quality_data else {}),
                               **({"token_schedules": {name: {"chosen": sched.knobs, "flops_cut": sched.flops_cut,
                                                              "trials": [t.as_dict() for t in sched.trials]}
                                                       for name, sched in result.schedules.items()}}
                                  if result.schedules else {})}
            write_report(report_tmp, model=os.fspath(model), target=target, variants=result.reports,
                         best=result.best, settings=report_settings, refusals=result.refusals,
                         export=export.as_dict(), inputs=input_records(graph),
                         prediction=result.prediction, host=host_record(),
                         versions=versions())
    finally:
        result.cleanup()
    return OptimizeOutcome(result, graph, export, output_dir / "report.json", output_dir / "model.onnx")


PLOT_NAME = "predicted_vs_measured.png"
PARETO_NAME = "pareto.png"


def _figures(result: OptimizeResult, model_name: str, *, target: str, backend: str, budget: float,
             shapes: list[str], measure: bool, allow_approx: bool) -> dict[str, Callable[[], Any]]:
    """The figures written beside report.json, by file name, each built when called: predicted against
    measured latency when variants were measured; latency against quality when approximate ones were judged."""
    from tfcompile.compare import score

    name = plots.short_name(model_name)
    figures: dict[str, Callable[[], Any]] = {}
    rows, labels, key = _plot_rows(result, target, shapes)
    if measure and rows:
        measured_on = next(r.backend for r in result.reports if r.measured_ms is not None) or backend
        figures[PLOT_NAME] = lambda: plots.predicted_vs_measured(
            rows, score(rows), title=f"{name} on {target} ({measured_on}): predicted vs measured latency",
            labels=labels, key=key)
    if allow_approx and any(not r.exact for r in result.reports):
        figures[PARETO_NAME] = lambda: plots.pareto_of_reports(
            result.reports, target=target, budget=budget, best=result.best,
            title=f"{name} on {target} ({backend}): latency against quality, {len(result.reports)} variants")
    return figures


def _shapes(workload: Workload, load: LoadOptions) -> list[str]:
    """Batch x sequence of each scenario of the workload, or of the one traced shape."""
    if workload.scenarios:
        return [f"{s.batch}x{s.seq}" for s in workload.scenarios]
    return [f"{load.batch}x{load.seq}"]


def _plot_rows(result: OptimizeResult, target: str, shapes: list[str]) -> tuple[list, list[str], dict[str, str]]:
    """One point per measured variant, per scenario of a workload: measured against the target's prediction;
    with each point's label ("v3 8x128") and the key to the ids."""
    from tfcompile.compare import ComparisonRow

    ids = plots.report_ids(result.reports)
    rows, labels, key = [], [], {}
    for report in result.reports:
        if report.measured_ms is None:
            continue
        key[ids[report.name]] = report.name
        predictor = "calibrated" if report.prediction.startswith("calibrated") else "roofline"
        if report.scenario_measured_ms is not None:
            for shape, measured, predicted in zip(shapes, report.scenario_measured_ms, report.scenario_ms):
                rows.append(ComparisonRow(f"{report.name} {shape}", measured, {predictor: predicted}))
                labels.append(f"{ids[report.name]} {shape}")
        else:
            rows.append(ComparisonRow(report.name, report.measured_ms, {predictor: report.predicted_ms[target]}))
            labels.append(f"{ids[report.name]} {shapes[0]}")
    return rows, labels, key


def _workload(lengths, batch_sizes, seq_lens, lengths_file, load: LoadOptions) -> tuple[Workload, LoadOptions]:
    """The workload the options describe, and the load options of the shape to trace for it."""
    for name, sizes in (("--batch", batch_sizes), ("--seq", seq_lens)):
        if sizes is not None and (isinstance(sizes, str) or not isinstance(sizes, (list, tuple)) or not sizes
                                  or not all(_is_int(n) and n > 0 for n in sizes)):
            raise InvalidOptionError(f"{name} {sizes!r}: a list of positive whole numbers")
    several = len(batch_sizes or ()) > 1 or len(seq_lens or ()) > 1 or lengths_file is not None
    if several and lengths is not None:
        raise InvalidOptionError("--lengths gives the one traced batch's lengths; a workload of several batches "
                                 "comes from --lengths-file (or lists of --batch and --seq), not both")
    if lengths_file is not None:
        if not isinstance(lengths_file, (str, os.PathLike)) or not os.fspath(lengths_file):
            raise InvalidOptionError(f"--lengths-file {lengths_file!r}: a file path")
        if seq_lens is not None and len(seq_lens) > 1:
            raise InvalidOptionError("with --lengths-file, --seq is the length batches are padded to: one value")
        load = dataclasses.replace(load, **({"seq": seq_lens[0]} if seq_lens else {}))
        batches = list(batch_sizes or [load.batch])
        workload = workload_from_distribution(read_lengths_file(lengths_file), batches, load.seq, seed=load.seed)
        return workload, dataclasses.replace(load, batch=batches[0])
    if several:
        batches, seqs = list(batch_sizes or [load.batch]), list(seq_lens or [load.seq])
        # Traced at the largest shape: it dominates the expected latency, and the search prunes there.
        return workload_grid(batches, seqs), dataclasses.replace(load, batch=max(batches), seq=max(seqs))
    load = dataclasses.replace(load, **({"batch": batch_sizes[0]} if batch_sizes else {}),
                               **({"seq": seq_lens[0]} if seq_lens else {}))
    return Workload(lengths=tuple(int(n) for n in lengths) if lengths is not None else None), load


def _workload_record(workload: Workload) -> dict:
    return {"objective": "expected latency over the scenarios",
            "scenarios": [{"batch": s.batch, "seq": s.seq, "lengths": list(s.lengths) if s.lengths else None,
                           "weight": w} for s, w in zip(workload.scenarios, workload.weights())]}


def _check_arguments(model, output_dir, *, target, backend, passes, allow_approx, budget, lengths, measure,
                     measure_top, repeat, quantize, remote, load, torch_options) -> None:
    """The library entry's arguments, by type and range: a wrong one is an InvalidOptionError naming it,
    never a TypeError from deep inside (the CLI's options arrive here too)."""
    if not isinstance(model, (str, os.PathLike)) or not os.fspath(model):
        raise InvalidOptionError(f"model {model!r}: a zoo name, a model file or directory, or module:factory")
    if not isinstance(output_dir, (str, os.PathLike)) or not os.fspath(output_dir):
        raise InvalidOptionError(f"-o {output_dir!r}: a directory path for report.json and model.onnx")
    if not isinstance(target, (str, DeviceSpec)):
        raise InvalidOptionError(f"--target {target!r}: a target name (see `tfcompile targets`) or a DeviceSpec")
    if backend not in BACKENDS:
        raise InvalidOptionError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if quantize not in QUANTIZE_MODES:
        raise InvalidOptionError(f"--quantize {quantize!r}: use one of {', '.join(QUANTIZE_MODES)}")
    for name, flag in (("--allow-approx", allow_approx), ("--measure", measure)):
        if not isinstance(flag, bool):
            raise InvalidOptionError(f"{name} {flag!r}: True or False")
    if not _is_number(budget):
        raise InvalidOptionError(f"--budget {budget!r}: a quality figure between 0 and 1 (e.g. 0.99)")
    for name, value in (("--repeat", repeat), ("--measure-top", measure_top)):
        if not _is_int(value):
            raise InvalidOptionError(f"{name} {value!r}: a whole number")
    if passes is not None:
        if isinstance(passes, str) or not isinstance(passes, (list, tuple)) \
                or not all(isinstance(p, str) for p in passes):
            raise InvalidOptionError(f"--passes {passes!r}: a list of pass names, e.g. ['fold_constants']")
        if not passes:
            raise InvalidOptionError("--passes names no pass; leave it out to search every pipeline")
    if lengths is not None:
        if isinstance(lengths, str) or not isinstance(lengths, (list, tuple)) \
                or not lengths or not all(_is_int(n) and n > 0 for n in lengths):
            raise InvalidOptionError(f"--lengths {lengths!r}: one positive whole number per sequence of the "
                                     "batch, e.g. [37, 128, 5]")
    if not isinstance(load, LoadOptions):
        raise InvalidOptionError(f"load {load!r}: a tfcompile.frontend.LoadOptions")
    if remote is not None:
        from tfcompile.backends.tvm.remote import RemoteSpec

        if not isinstance(remote, RemoteSpec):
            raise InvalidOptionError(f"--remote {remote!r}: a RemoteSpec, e.g. RemoteSpec.parse('HOST:PORT', "
                                     "device_key)")
    if torch_options:
        if backend != "torch" or set(torch_options) != {"device", "mode", "precision"}:
            raise InvalidOptionError(f"torch_options {torch_options!r}: device, mode and precision, with --backend "
                                     "torch")
        if torch_options["precision"] in ("bf16", "fp16"):
            raise InvalidOptionError(f"--precision {torch_options['precision']}: in optimize a precision is a "
                                     "variant the search weighs and checks (half_precision, quantize_int8_dynamic, "
                                     "with --allow-approx); --precision casts every variant alike (compare)")
    if measure:
        from tfcompile.measure import require_measurable

        require_measurable(target if isinstance(target, str) else target.name, remote,
                           on_cuda=torch_options.get("device") == "cuda")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_settings(settings: OptimizeSettings, load: LoadOptions, output_dir: Path) -> None:
    """Every option that cannot work fails here, before the model is loaded."""
    settings.context()  # an unknown target or an unreadable profile
    if not 0.0 <= settings.budget <= 1.0:  # NaN fails this too
        raise InvalidOptionError(f"--budget {settings.budget}: a quality figure between 0 and 1 (e.g. 0.99)")
    if settings.measure_budget_s is not None and not (_is_number(settings.measure_budget_s)
                                                       and settings.measure_budget_s > 0):
        raise InvalidOptionError(f"--time-budget {settings.measure_budget_s}: a positive number of seconds")
    if settings.repeat < 1:
        raise InvalidOptionError(f"--repeat {settings.repeat}: at least one timed run")
    if settings.measure_top < 0:
        raise InvalidOptionError(f"--measure-top {settings.measure_top}: zero or more variants")
    check_output_dir(output_dir)
    if settings.remote is not None and not settings.workload.is_single_shape:
        raise TfcompileError("--remote measures one batch shape; give one --batch and --seq (no --lengths-file)")
    if settings.remote is not None and not settings.measure:
        raise TfcompileError("--remote is where --measure measures: add --measure")
    if settings.pipeline is not None:
        for name in settings.pipeline:
            get_pass(name)
        check_pipeline(settings.pipeline)
    lengths = settings.workload.lengths
    if lengths:
        if max(lengths) > load.seq:
            raise TfcompileError(f"--lengths: {max(lengths)} is longer than --seq {load.seq}")
        if len(lengths) != load.batch:
            raise TfcompileError(f"--lengths gives {len(lengths)} lengths for --batch {load.batch}")


def _export_first_that_lowers(result: OptimizeResult, original: ModelGraph, quantize: str, budget: float,
                              final_path: Path, context, progress) -> ExportCheck:
    """Export the best variant; one the backend cannot lower (an exporter without a translation for one of its
    ops, ONNX Runtime refusing it, outputs that differ) is reported as such and the next best is taken."""
    from tfcompile.errors import BackendError

    while True:
        try:
            return _export_best(result, original, quantize, budget, final_path, context)
        except BackendError as exc:
            failed = next(r for r in result.reports if r.name == result.best)
            failed.reject("not lowered", f"export failed: {exc}")
            following = next((r.name for r in result.reports if r.eligible and r.name in result.variants), None)
            if following is None:
                raise
            progress(f"{failed.id} could not be exported; exporting {following}")
            result.best = following


def _export_best(result: OptimizeResult, original: ModelGraph, quantize: str, budget: float,
                 final_path: Path, context) -> ExportCheck:
    """Export the best variant (or reuse its measured export), quantize on request, check it, write it."""
    from tfcompile.backends import ort
    from tfcompile.backends.quantize import quantize as quantize_onnx
    from tfcompile.structure.precision import graph_precision
    from tfcompile.verify import compare_outputs

    best = result.variants[result.best]
    best_graph = best.graph
    if quantize == "none":
        from tfcompile.backends.dynamic_export import export_variant_onnx

        # Symbolic batch and sequence where the variant allows, checked at several shapes before it is written.
        deployed = export_variant_onnx(best, final_path, original=original, context=context)
        worst = max(deployed.checks, key=lambda c: c.max_rel_err)
        return ExportCheck(quantize, worst.max_abs_err, worst.max_rel_err, min(c.quality for c in deployed.checks),
                           worst.quality_metric, deployed.dims, deployed.static_reason,
                           tuple(c.label() for c in deployed.checks), graph_precision(best_graph))
    onnx_path = result.onnx_files.get(result.best) or ort.export_onnx(best_graph, result.workdir / "best.onnx")
    if quantize != "none":
        onnx_path = quantize_onnx(onnx_path, result.workdir / f"model-{quantize}.onnx", quantize)
    outputs = ort.OrtModel(onnx_path).run(best_graph.example_inputs)
    check = compare_outputs(original.run(best_graph.example_inputs), outputs, original.output_names)
    if quantize != "none" and check.quality < budget:
        raise TfcompileError(f"{quantize} quantization gives {check.quality_metric} {check.quality:.4f}, below "
                             f"--budget {budget}; nothing written (raise the budget or use --quantize none)")
    ort.single_file(Path(onnx_path), final_path)
    return ExportCheck(quantize, check.max_abs_err, check.max_rel_err, check.quality, check.quality_metric,
                       static_reason=f"{quantize} quantization is checked at the traced shape only",
                       checked_at=("x".join(map(str, best_graph.example_inputs[0].shape)),), precision=quantize)


def input_records(graph: ModelGraph) -> list[dict[str, Any]]:
    """The traced inputs as report.json lists them."""
    return [{"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in zip(graph.input_names, graph.example_inputs)]


RUN_FILE_NAME = "run.toml"


def run_file_text(model, *, target: str | None, backend: str, passes, allow_approx: bool, budget: float, lengths,
                  lengths_file, calibration_data, measure: bool, measure_top: int, repeat: int,
                  measure_budget_s: float | None, quantize: str, batch_sizes, seq_lens, load: LoadOptions,
                  output_dir: Path, torch_options: dict[str, str] | None = None) -> str:
    """run.toml beside report.json: this run's options as ``tfcompile --run-config run.toml optimize`` reads them,
    so the model, its report and the settings that made them stay together."""
    def absolute(path) -> str:
        return os.fspath(Path(path).resolve())

    values: dict[str, Any] = {"model": os.fspath(model)}
    if target is not None:
        values["target"] = target
    values.update({"backend": backend, "allow-approx": allow_approx, "budget": budget, "measure": measure,
                   "measure-top": measure_top, "repeat": repeat, "quantize": quantize,
                   "batch": [int(b) for b in batch_sizes], "seq": [int(q) for q in seq_lens], "seed": load.seed,
                   "output": absolute(output_dir)})
    optional = {"passes": ",".join(passes) if passes is not None else None,
                "lengths": ",".join(map(str, lengths)) if lengths else None,
                "lengths-file": absolute(lengths_file) if lengths_file is not None else None,
                "calibration-data": absolute(calibration_data) if calibration_data is not None else None,
                "time-budget": measure_budget_s,
                "config": absolute(load.config) if load.config is not None else None,
                "timeout": load.timeout_s}
    values.update({key: value for key, value in optional.items() if value is not None})
    values.update(torch_options or {})
    if load.trust_pickle:
        values["trust-pickle"] = True
    if load.input_shapes:
        values["input-shape"] = [
            f"{name}={'x'.join(map(str, shape))}" + (f":{str(load.input_dtypes[name]).removeprefix('torch.')}"
                                                      if load.input_dtypes and name in load.input_dtypes else "")
            for name, shape in load.input_shapes.items()]
    lines = ["# The options of this run: `tfcompile --run-config run.toml optimize` runs it again.",
             *([] if target is not None else ["# --device-file was given: give it again on the command line."]),
             "[optimize]"]
    # JSON's strings, numbers, booleans and arrays of them are valid TOML values.
    lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"
