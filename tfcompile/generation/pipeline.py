"""``tfcompile optimize MODEL --generate`` as one library call.

``optimize_generation_model(model, output_dir, prompt_len=..., new_tokens=...)``
loads a causal LM (``frontend.load_causal_lm``), searches and ranks variants
by generation time (``generation.optimize``), then writes the best variant's
``prefill.onnx`` and ``decode.onnx`` and ``report.json``. Before they are
written, the two ONNX files run a whole greedy generation in ONNX Runtime,
which must give Hugging Face ``generate``'s tokens. As for ``optimize``, all
files or none: the earlier set stays as it was if anything fails.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

from tfcompile.cost_models.device import DeviceSpec
from tfcompile.errors import InvalidOptionError, TfcompileError
from tfcompile.frontend import LoadOptions, load_causal_lm
from tfcompile.generation.optimize import GenerationResult, GenerationSettings, optimize_generation
from tfcompile.outputs import atomic_paths, check_output_dir, in_private_tempdir
from tfcompile.provenance import host_record, versions
from tfcompile.report import write_report
from tfcompile.workload import Generation

FILES = ("prefill.onnx", "decode.onnx", "report.json")


@dataclasses.dataclass
class GenerationOutcome:
    result: GenerationResult
    report_path: Path
    onnx_paths: tuple[Path, Path]  # prefill, decode
    export: dict


@in_private_tempdir
def optimize_generation_model(model: str | os.PathLike, output_dir: Path | str, *, prompt_len: int,
                              new_tokens: int, batch: int = 1, target: str | DeviceSpec = "cpu",
                              backend: str = "ort", measure: bool = False, measure_top: int = 1, repeat: int = 5,
                              load: LoadOptions = LoadOptions(),
                              on_ranked: Callable[[GenerationResult], None] = lambda result: None,
                              progress: Callable[[str], None] = lambda _: None) -> GenerationOutcome:
    """Everything ``tfcompile optimize MODEL --generate -o OUTPUT_DIR`` does; see the module docstring."""
    generation = Generation(prompt_len, new_tokens)  # checks both numbers
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InvalidOptionError(f"--batch {batch!r}: one positive whole number for --generate")
    if backend not in ("ort", "torch"):
        raise InvalidOptionError(f"--backend {backend}: --generate measures on ONNX Runtime (ort) or torch; "
                                 "TVM does not run the generation graphs yet")
    for option, value in (("--repeat", repeat), ("--measure-top", measure_top)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidOptionError(f"{option} {value!r}: a positive whole number")
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    settings = GenerationSettings(target, generation, batch=batch, backend=backend, measure=measure,
                                  measure_top=measure_top, repeat=repeat)
    context = settings.context()  # an unknown target fails before the model loads
    if measure:
        from tfcompile.measure import require_measurable

        require_measurable(context.target)
    progress("loading model")
    module, name = load_causal_lm(model, load)
    result = optimize_generation(module, settings, name=name, progress=progress)
    try:
        on_ranked(result)
        if result.best is None:
            raise TfcompileError("no variant is eligible; nothing written")
        progress(f"writing {output_dir}")
        finals = [output_dir / file for file in FILES]
        with atomic_paths(*finals) as (prefill_tmp, decode_tmp, report_tmp):
            export = _export_best(result, prefill_tmp, decode_tmp, progress)
            target_name = target.name if isinstance(target, DeviceSpec) else target
            report_settings = {"batch": batch, "seq": prompt_len, "backend": backend if measure else None,
                               "allow_approx": False, "budget": 1.0, "lengths": None, "repeat": repeat,
                               "generation": {"prompt_len": prompt_len, "new_tokens": new_tokens,
                                              "max_len": generation.max_len,
                                              "cache": "static: one key and one value tensor per layer, "
                                                       f"[{batch}, kv_heads, {generation.max_len}, head_dim]",
                                              "objective": "TTFT + (new_tokens - 1) x TPOT"}}
            write_report(report_tmp, model=os.fspath(model), target=target_name, variants=result.reports,
                         best=result.best, settings=report_settings, refusals=result.refusals, export=export,
                         inputs=_inputs(result), prediction=result.prediction, host=host_record(),
                         versions=versions())
    finally:
        result.cleanup()
    return GenerationOutcome(result, finals[2], (finals[0], finals[1]), export)


def _export_best(result: GenerationResult, prefill_path: Path, decode_path: Path, progress) -> dict:
    """Write the best variant's two ONNX files and generate with them in ONNX Runtime: same tokens or nothing."""
    from tfcompile.backends.ort import export_onnx
    from tfcompile.generation.measure import measure_generation

    graphs = result.graphs_of(result.best)
    progress("exporting the best variant's prefill and decode step to ONNX")
    export_onnx(graphs.prefill, prefill_path)
    export_onnx(graphs.decode, decode_path)
    progress("generating with the exported files in ONNX Runtime")
    timing = measure_generation(prefill_path, decode_path, graphs.cache, *result.prompt,
                                new_tokens=result.reference_tokens.shape[1], repeat=1, warmup=0)
    same = bool((timing.tokens == result.reference_tokens.numpy()).all())
    if not same:
        raise TfcompileError(f"the exported {result.best} generates other tokens than the original model in "
                             "ONNX Runtime; nothing written")
    return {"files": list(FILES[:2]), "runtime": "onnxruntime", "tokens_identical": same,
            "checked": f"greedy generation of {result.reference_tokens.shape[1]} tokens from the example prompt",
            "cache": "static; decode step inputs past_key_i/past_value_i, outputs present_key_i/present_value_i"}


def _inputs(result: GenerationResult) -> list[dict]:
    records = []
    for phase, graph in (("prefill", result.graphs.prefill), ("decode", result.graphs.decode)):
        for name, tensor in zip(graph.input_names, graph.example_inputs):
            records.append({"name": f"{phase}.{name}", "shape": list(tensor.shape),
                            "dtype": str(tensor.dtype).removeprefix("torch.")})
    return records
