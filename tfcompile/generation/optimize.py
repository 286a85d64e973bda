"""``optimize --generate``: exact passes on the prefill and decode-step graphs, ranked by generation time.

A decoder deployed for generation runs two graphs (``generation.trace``): the
prefill once per request and the decode step once per further token. A
variant is one pass pipeline applied to both; it is priced by the context's
cost model as TTFT + (new tokens - 1) x TPOT (``Generation.time_s``), and
every target's roofline prices it too, so the report shows where a device's
bytes or FLOPs decide. The search (``search.search``) walks the decode
graph, the phase that repeats, and builds the same pipeline on the prefill
graph for each candidate. The context's workload carries the generation, so
passes that cannot serve a cached decoder say why (``search.GENERATION_GAPS``).

Every variant is checked twice: the logits and caches of both phases against
the original graphs (exact tolerance), and a whole greedy generation through
the variant's graphs in torch against Hugging Face ``generate`` on the same
weights: an exact variant must produce the very same tokens, or it is
rejected. Measured variants (the baseline and the best predicted ones) are
exported to ONNX and timed on ONNX Runtime as real greedy generations with the
cache bound to pre-allocated buffers, round-robin in one process
(``generation.measure.measure_generations``); with the torch backend, the
GraphModules themselves run the generations (``measure_generations_torch``).
TVM does not run the generation graphs yet.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from tfcompile.cost_models import available_targets, load_device
from tfcompile.cost_models.device import DeviceSpec
from tfcompile.cost_models.model import RooflineCostModel
from tfcompile.generation.cost import GenerationPrediction, predict_generation
from tfcompile.generation.greedy import greedy_generate, hf_greedy
from tfcompile.generation.measure import GenerationTiming, measure_generations, measure_generations_torch
from tfcompile.generation.trace import GenerationGraphs, example_prompt, trace_generation
from tfcompile.passes import PassContext
from tfcompile.reference_speed import HostReadings, readings_around
from tfcompile.report import VariantReport, finish_ranking, to_measure
from tfcompile.search import Candidate, SearchSettings, search
from tfcompile.variants import Variant, build_variant
from tfcompile.verify import verify
from tfcompile.workload import Generation, Workload

EXACT_TOLERANCE = 1e-4  # as optimize.EXACT_TOLERANCE: relative to the largest output magnitude


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    target: str | DeviceSpec
    generation: Generation
    batch: int = 1
    backend: str = "ort"
    measure: bool = False
    measure_top: int = 1
    repeat: int = 5  # timed generations per measured variant

    def context(self) -> PassContext:
        return PassContext.build(self.target, self.backend, workload=Workload(generation=self.generation))


@dataclasses.dataclass
class GenerationResult:
    graphs: GenerationGraphs  # the original's
    reports: list[VariantReport]  # ranked by generation time
    variants: dict[str, tuple[Variant, Variant]]  # name -> (prefill, decode) variants whose graphs are held
    best: str | None
    refusals: dict[str, str]
    prediction: dict  # the target's cost model: which, whence
    timings: dict[str, GenerationTiming]  # measured variants
    onnx_files: dict[str, tuple[Path, Path]]  # measured variants' (prefill, decode) ONNX files
    workdir: Path
    prompt: tuple[torch.Tensor, torch.Tensor]  # the input_ids and attention_mask generated from
    reference_tokens: torch.Tensor  # [B, new_tokens]: Hugging Face generate's on the original weights

    def graphs_of(self, name: str) -> GenerationGraphs:
        prefill, decode = self.variants[name]
        return GenerationGraphs(prefill.graph, decode.graph, self.graphs.cache, self.graphs.prompt_len)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


Progress = Callable[[str], None]


def optimize_generation(model: torch.nn.Module, settings: GenerationSettings, *, name: str = "model",
                        progress: Progress = lambda _: None) -> GenerationResult:
    """Trace ``model`` (a transformers causal LM) for ``settings.generation``, search, verify, rank, measure."""
    context = settings.context()
    generation = settings.generation
    progress("tracing the prefill and decode-step graphs")
    graphs = trace_generation(model, batch=settings.batch, prompt_len=generation.prompt_len,
                              max_len=generation.max_len, name=name)
    prompt = example_prompt(model.config.vocab_size, settings.batch, generation.prompt_len)
    progress("generating the reference tokens with Hugging Face generate")
    reference_tokens = hf_greedy(model, *prompt, new_tokens=generation.new_tokens)
    references = (graphs.prefill.run(), graphs.decode.run())
    rooflines = {t: RooflineCostModel(context.device if t == context.target else load_device(t), context.backend)
                 for t in available_targets()}
    reports: dict[str, VariantReport] = {}
    prefills: dict[str, Variant] = {}

    def evaluate(decode: Variant) -> Candidate:
        prefill = build_variant(graphs.prefill, decode.spec, context)
        prefills[decode.name] = prefill
        pair = GenerationGraphs(prefill.graph, decode.graph, graphs.cache, graphs.prompt_len)
        report = _report_for(decode.name, prefill, decode, pair, graphs, references, context, rooflines,
                             generation)
        progress(f"generating with {decode.name}")
        tokens = greedy_generate(prefill.graph.run, decode.graph.run, graphs.cache, *prompt,
                                 new_tokens=generation.new_tokens)
        report.generation["tokens_identical"] = bool(torch.equal(tokens, reference_tokens))
        if report.eligible and not report.generation["tokens_identical"]:
            report.reject("tokens differ", "greedy tokens differ from Hugging Face generate on the same weights")
        reports[decode.name] = report
        return Candidate(decode, report.predicted_ms[context.target] / 1e3, report.eligible)

    result = search(graphs.decode, evaluate, SearchSettings(), context, progress)
    variants = {c.variant.name: (prefills[c.variant.name], c.variant) for c in result.candidates
                if c.variant.graph is not None}
    workdir = Path(tempfile.mkdtemp(prefix="tfcompile-generate-"))
    timings: dict[str, GenerationTiming] = {}
    onnx_files: dict[str, tuple[Path, Path]] = {}
    readings = HostReadings()  # how fast the host ran around the timed generations
    try:
        if settings.measure:
            chosen = to_measure(reports, variants, context.target, settings.measure_top)
            if settings.backend != "torch":
                onnx_files = _export_pairs({n: variants[n] for n in chosen}, workdir, progress)
            with readings_around(context.cost_model, True) as readings:  # both runtimes generate on this host's CPU
                if settings.backend == "torch":
                    progress("timing generations in torch")
                    pairs = {n: (variants[n][0].graph, variants[n][1].graph) for n in chosen}
                    timings = measure_generations_torch(pairs, graphs.cache, *prompt,
                                                        new_tokens=generation.new_tokens, repeat=settings.repeat)
                else:
                    progress("timing generations on ONNX Runtime")
                    timings = measure_generations(onnx_files, graphs.cache, *prompt,
                                                  new_tokens=generation.new_tokens, repeat=settings.repeat)
            for variant_name, timing in timings.items():
                _record_timing(reports[variant_name], timing, reference_tokens, settings.backend)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    ranked, best = finish_ranking(reports, variants, context.target)
    prediction = readings.annotate(context.cost_model.provenance)
    return GenerationResult(graphs, ranked, variants, best, result.refusals, prediction,
                            timings, onnx_files, workdir, prompt, reference_tokens)


def _report_for(name: str, prefill: Variant, decode: Variant, pair: GenerationGraphs, originals: GenerationGraphs,
                references, context: PassContext, rooflines, generation: Generation) -> VariantReport:
    new_tokens = generation.new_tokens
    by_target = {t: predict_generation(pair, model, new_tokens=new_tokens) for t, model in rooflines.items()}
    by_target[context.target] = predicted = predict_generation(pair, context.cost_model, new_tokens=new_tokens)
    applied = list(dict.fromkeys(prefill.applied_passes + decode.applied_passes))
    report = VariantReport(
        name=name, passes=applied, exact=prefill.exact and decode.exact,
        predicted_ms={t: p.generation_s * 1e3 for t, p in by_target.items()},
        prediction=context.cost_model.label,
        flops=predicted.prefill.flops + (new_tokens - 1) * predicted.decode.flops,
        bytes=predicted.prefill.bytes_moved + (new_tokens - 1) * predicted.decode.bytes_moved,
        skipped=_skipped(prefill, decode),
    )
    checks = [verify(originals.prefill, prefill.graph, references[0]),
              verify(originals.decode, decode.graph, references[1])]
    report.max_abs_err = max(c.max_abs_err for c in checks)
    report.max_rel_err = max(c.max_rel_err for c in checks)
    if not report.exact:
        report.reject("approximate", "approximate passes are not searched for generation")
    elif report.max_rel_err > EXACT_TOLERANCE:
        report.reject("deviates", f"exact variant deviates by {report.max_rel_err:.1e} relative: not ranked")
    report.generation = {"predicted": {t: _phases(p) for t, p in by_target.items()}}
    return report


def _phases(prediction: GenerationPrediction) -> dict:
    return {"ttft_ms": prediction.ttft_s * 1e3, "tpot_ms": prediction.tpot_s * 1e3,
            "prefill_bound": prediction.bound("prefill"), "decode_bound": prediction.bound("decode")}


def _skipped(prefill: Variant, decode: Variant) -> list[dict[str, str]]:
    skipped = {}
    for phase, variant in (("prefill", prefill), ("decode step", decode)):
        for outcome in variant.outcomes:
            if not outcome.applied:
                skipped.setdefault(outcome.name, f"{phase}: {outcome.reason}")
    return [{"pass": name, "reason": reason} for name, reason in skipped.items()]


def _export_pairs(pairs: dict[str, tuple[Variant, Variant]], workdir: Path,
                  progress: Progress) -> dict[str, tuple[Path, Path]]:
    from tfcompile.backends.ort import export_onnx

    files = {}
    for index, (name, (prefill, decode)) in enumerate(pairs.items()):
        progress(f"exporting {name} to ONNX")
        folder = workdir / f"variant{index}"
        folder.mkdir()
        files[name] = (export_onnx(prefill.graph, folder / "prefill.onnx", external_data=True),
                       export_onnx(decode.graph, folder / "decode.onnx", external_data=True))
    return files


def _record_timing(report: VariantReport, timing: GenerationTiming, reference_tokens: torch.Tensor,
                   backend: str) -> None:
    report.measured_ms = timing.generation_ms
    report.backend = backend
    report.measured_spread = None
    report.throughput_per_s = timing.tokens_per_s
    report.generation["measured"] = {**timing.as_dict(),
                                     "tokens_identical": bool(torch.equal(torch.from_numpy(timing.tokens),
                                                                          reference_tokens))}
