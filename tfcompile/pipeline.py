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
it replaces ``model.onnx``, and both files are written atomically.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from tfcompile.errors import InvalidOptionError, TfcompileError
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.graph import ModelGraph
from tfcompile.optimize import OptimizeResult, OptimizeSettings, optimize
from tfcompile.outputs import check_output_dir
from tfcompile.passes import Workload, check_pipeline, get_pass
from tfcompile.report import write_report

QUANTIZE_MODES = ("none", "fp16", "int8")


@dataclasses.dataclass
class ExportCheck:
    """How the written model.onnx compares with the torch original."""

    quantize: str
    max_abs_err: float
    max_rel_err: float
    quality: float
    quality_metric: str

    @property
    def exact(self) -> bool:
        return self.quantize == "none"

    def as_dict(self) -> dict[str, Any]:
        return {"quantize": self.quantize, "exact": self.exact, "max_abs_err": self.max_abs_err,
                "max_rel_err": self.max_rel_err, "quality": self.quality, "quality_metric": self.quality_metric}


@dataclasses.dataclass
class OptimizeOutcome:
    result: OptimizeResult
    graph: ModelGraph  # the loaded original, prepared for the workload
    export: ExportCheck
    report_path: Path
    onnx_path: Path


def optimize_model(model: str, output_dir: Path | str, *, target: str = "cpu", backend: str = "ort",
                   passes: tuple[str, ...] | None = None, allow_approx: bool = False, budget: float = 0.99,
                   lengths: tuple[int, ...] | None = None, measure: bool = False, measure_top: int = 1,
                   repeat: int = 10, quantize: str = "none", remote=None, load: LoadOptions = LoadOptions(),
                   on_ranked: Callable[[ModelGraph, OptimizeResult], None] = lambda graph, result: None,
                   progress: Callable[[str], None] = lambda _: None) -> OptimizeOutcome:
    """Everything ``tfcompile optimize MODEL -o OUTPUT_DIR`` does; see the module docstring.

    ``on_ranked(graph, result)`` sees the loaded model and the ranked result
    before anything is exported (the CLI prints its table there, so it shows
    even when no variant is eligible).
    """
    output_dir = Path(output_dir)
    settings = OptimizeSettings(target=target, pipeline=tuple(passes) if passes is not None else None,
                                allow_approx=allow_approx, budget=budget, measure=measure, measure_top=measure_top,
                                backend=backend, repeat=repeat,
                                workload=Workload(lengths=tuple(int(n) for n in lengths) if lengths else None),
                                remote=remote)
    _check_settings(settings, quantize, load, output_dir)
    progress("loading model")
    graph = load_model(model, load)
    if settings.workload.lengths:
        from tfcompile.passes.padding import with_lengths

        # The baseline runs the padded batch those lengths describe; variants are checked at valid positions.
        graph = with_lengths(graph, list(settings.workload.lengths))
    result = optimize(graph, settings, progress=progress)
    try:
        on_ranked(graph, result)
        if result.best is None:
            raise TfcompileError("no variant is eligible; nothing written")
        progress(f"writing {output_dir}")
        export = _export_best(result, graph, quantize, budget, output_dir / "model.onnx")
        report_settings = {"batch": load.batch, "seq": load.seq, "backend": backend if measure else None,
                           **({"remote": str(remote)} if remote is not None else {}),
                           "allow_approx": allow_approx, "budget": budget,
                           "lengths": list(settings.workload.lengths) if settings.workload.lengths else None}
        write_report(output_dir / "report.json", model=model, target=target, variants=result.reports,
                     best=result.best, settings=report_settings, refusals=result.refusals,
                     export=export.as_dict())
    finally:
        result.cleanup()
    return OptimizeOutcome(result, graph, export, output_dir / "report.json", output_dir / "model.onnx")


def _check_settings(settings: OptimizeSettings, quantize: str, load: LoadOptions, output_dir: Path) -> None:
    """Every option that cannot work fails here, before the model is loaded."""
    settings.context()  # an unknown target or an unreadable profile
    if not 0.0 <= settings.budget <= 1.0:  # NaN fails this too
        raise InvalidOptionError(f"--budget {settings.budget}: a quality figure between 0 and 1 (e.g. 0.99)")
    if settings.repeat < 1:
        raise InvalidOptionError(f"--repeat {settings.repeat}: at least one timed run")
    if settings.measure_top < 0:
        raise InvalidOptionError(f"--measure-top {settings.measure_top}: zero or more variants")
    check_output_dir(output_dir)
    if quantize not in QUANTIZE_MODES:
        raise TfcompileError(f"--quantize {quantize!r}: use one of {', '.join(QUANTIZE_MODES)}")
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


def _export_best(result: OptimizeResult, original: ModelGraph, quantize: str, budget: float,
                 final_path: Path) -> ExportCheck:
    """Export the best variant (or reuse its measured export), quantize on request, check it, write it."""
    from tfcompile.backends import ort
    from tfcompile.backends.quantize import quantize as quantize_onnx
    from tfcompile.verify import compare_outputs

    best_graph = result.variants[result.best].graph
    onnx_path = result.onnx_files.get(result.best) or ort.export_onnx(best_graph, result.workdir / "best.onnx")
    if quantize != "none":
        onnx_path = quantize_onnx(onnx_path, result.workdir / f"model-{quantize}.onnx", quantize)
    outputs = ort.OrtModel(onnx_path).run(best_graph.example_inputs)
    check = compare_outputs(original.run(best_graph.example_inputs), outputs, original.output_names)
    if quantize != "none" and check.quality < budget:
        raise TfcompileError(f"{quantize} quantization gives {check.quality_metric} {check.quality:.4f}, below "
                             f"--budget {budget}; nothing written (raise the budget or use --quantize none)")
    ort.single_file(Path(onnx_path), final_path)
    return ExportCheck(quantize, check.max_abs_err, check.max_rel_err, check.quality, check.quality_metric)
