"""GPU check (issue 24): calibration, compare over zoo variants and the premerge_ffn crossover, one table.

1. Calibration: the torch device backend's micro-benchmarks (``calibrate_device``:
   GEMM M/N/K sweep with skinny M, SDPA, LayerNorm/RMSNorm, softmax,
   elementwise, launch floor) timed in the first of ``--modes`` at each
   precision and fitted with ``fit_checked``: fit MAPE, and the held-out check
   against the roofline (a fit worse than the roofline falls back to it).
2. Compare: bert-base, gpt2-small, vit-base and llama-tiny (seeded weights),
   batch 1 and 8, sequence 128 and 512 (vit-base: its 224x224 image), fp32 and
   bf16, the baseline and pass variants (``--variants``, from
   ``variants.BUILTIN_VARIANTS``), in each mode: every run checked against the
   CPU fp32 reference and timed round-robin (CUDA events, median after
   warm-up). None of these is a micro-benchmark the calibration saw. Each row
   is predicted by the calibrated profile of its mode and precision, the
   uncalibrated roofline and the profile's FLOPs-only fit; MAPE, share within
   ±10 % and Kendall τ per predictor and mode.
3. The ``premerge_ffn`` crossover: one FFN (``--ffn`` d x hidden) in its
   low-rank form (``structure_ffn``, rank d/4 on both projections, what
   ``premerge_ffn`` merges) and dense (the merged form's shape) over token
   counts T, measured and predicted, with where each crosses over and what
   ``premerge_ffn`` decides at each T with the calibrated model.
4. Padding removal on bert-base (batch 8, lengths uniform in [16, seq], seed 0)
   in fp32 and fp16 (``--padding-precisions``), each mode: the padded model
   against three packed forms (``PACKED_FORMS``: the per-length attention loop,
   and one variable-length attention kernel per layer with static or run-time
   offsets), measured and predicted, and each measured speed-up as a share of
   the ideal (padded tokens / valid tokens).

Roofline rows in graphs mode are predicted with the replay launch cost
(devices.md §3: 0.98 µs per kernel) instead of the target's eager per-kernel
overhead. Writes everything to ``--json``.

On an H100/H200 (about 6 minutes; ``--budget-s`` stops starting new shapes):

    python benchmarks/gpu_check.py --json gpu_check.json

In CI or on a laptop (tiny configs, measured CPU figures, about 40 s on 2 cores):

    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick

Imports neither ONNX Runtime nor TVM. SciPy is optional: calibration fits with
SciPy's NNLS where it is installed, else with numpy (``cost_models.nnls``), and
Kendall's τ is computed here.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's source, uninstalled

from tfcompile.backends.torch_device import MODES, PRECISIONS, cast_graph, lower_device, measure_device  # noqa: E402
from tfcompile.calibrate_device import CPU_SIZES, SuiteSizes, calibrate_torch, device_suite  # noqa: E402
from tfcompile.cost_models.calibration import improves_on_roofline, save_profile  # noqa: E402
from tfcompile.cost_models.model import CalibratedCostModel, cost_model_for  # noqa: E402
from tfcompile.errors import TfcompileError, first_line  # noqa: E402
from tfcompile.frontend import LoadOptions, load_model, zoo  # noqa: E402
from tfcompile.graph import export_module  # noqa: E402
from tfcompile.variants import BUILTIN_VARIANTS, build_variant  # noqa: E402

MODELS = ["bert-base", "gpt2-small", "vit-base", "llama-tiny"]
PREDICTORS = ("calibrated", "roofline", "flops_only")
REPLAY_OVERHEAD_S = 0.98e-6  # devices.md §3, H100 CUDA-graph replay per kernel (M*)
# --quick: the test suite's tiny configs, which keep each architecture.
TINY = zoo.TINY_CONFIGS
# --quick on cpu: a third of the cpu micro-benchmarks' GEMM shapes, still every class.
QUICK_SIZES = dataclasses.replace(CPU_SIZES, gemm_shapes=CPU_SIZES.gemm_shapes[:2])


@dataclasses.dataclass
class Row:
    model: str
    batch: int
    seq: int | None
    precision: str
    mode: str
    variant: str = "baseline"
    predicted_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # per predictor
    measured_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    max_rel_err: float | None = None
    tolerance: float | None = None
    refused: str | None = None

    def ratio(self, predictor: str = "calibrated") -> float | None:
        predicted = self.predicted_ms.get(predictor)
        return self.measured_ms / predicted if self.measured_ms and predicted else None

    @property
    def ok(self) -> bool | None:
        return None if self.max_rel_err is None else self.max_rel_err <= self.tolerance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--target", help="cost-model target (default: h100 on cuda, cpu on cpu)")
    parser.add_argument("--mem-bandwidth-gbps", type=float,
                        help="replace the target's memory bandwidth (an H200 has 4800 against the H100's 3350)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--modes", default="graphs,eager",
                        help="the first is calibrated (on cpu, where graphs cannot run: eager)")
    parser.add_argument("--variants", default="baseline,cleanup+merge_qkv",
                        help=f"of {', '.join(v.name for v in BUILTIN_VARIANTS)}")
    parser.add_argument("--compile", action="store_true", help="add torch.compile (Inductor) to the modes")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--max-shape-s", type=float, default=8.0, help="timing budget per shape")
    parser.add_argument("--budget-s", type=float, default=360.0, help="start no new shape after this long")
    parser.add_argument("--ffn", default="768x3072", help="d x hidden of the premerge_ffn crossover's FFN")
    parser.add_argument("--ffn-tokens", default="1,16,64,256,1024,4096,16384")
    parser.add_argument("--no-calibration", action="store_true")
    parser.add_argument("--save-profiles", action="store_true",
                        help="save profiles that pass the held-out check in the profile directory")
    parser.add_argument("--no-crossover", action="store_true")
    parser.add_argument("--no-padding", action="store_true")
    parser.add_argument("--padding-precisions", default="fp32,fp16", help="precisions of the padding check")
    parser.add_argument("--quick", action="store_true", help="tiny configs, small shapes, 5 runs")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads with --device cpu: one, so that other processes on a small machine do "
                             "not stall OpenMP's barriers (measured: 1.3 ms runs taking 80-160 ms on 2 shared cores)")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.cpu_threads)
    if args.device == "cpu" and args.modes == parser.get_default("modes"):
        args.modes = "eager"  # graphs (CUDA-graph replay) is refused on cpu
    if args.quick:  # tiny shapes and fewer runs, unless given
        for name, value in (("batches", "1,2"), ("seqs", "32"), ("repeat", 5), ("warmup", 1), ("ffn", "128x512"),
                            ("ffn_tokens", "1,16,64,256,1024")):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    started = time.perf_counter()
    modes = [m for m in _list(args.modes) + (["compile"] if args.compile else []) if m in MODES]
    precisions = [p for p in _list(args.precisions) if p in PRECISIONS]
    specs = [v for v in BUILTIN_VARIANTS if v.name in _list(args.variants)]
    cost_model = _cost_model(args)
    environment = _environment(args, cost_model)
    print(" | ".join(f"{k} {v}" for k, v in environment.items()), flush=True)

    calibration = {} if args.no_calibration else _calibrate(modes[0], precisions, cost_model, args)
    print(f"  calibration done at {time.perf_counter() - started:.0f} s", flush=True)
    crossover = None if args.no_crossover else _crossover(modes[0], precisions[0], cost_model, calibration, args)
    rows: list[Row] = []
    skipped: list[str] = []
    # Shapes outermost: if the budget runs out, every model has its first shapes.
    for batch in [int(b) for b in _list(args.batches)]:
        for seq in [int(s) for s in _list(args.seqs)]:
            for model in _list(args.models):
                if model == "vit-base" and seq != int(_list(args.seqs)[0]):
                    continue  # vit-base's shape does not depend on seq
                label = f"{model} b{batch}" + ("" if model == "vit-base" else f" s{seq}")
                if time.perf_counter() - started > args.budget_s:
                    skipped.append(label)
                    continue
                rows += _check_shape(model, batch, None if model == "vit-base" else seq, precisions, modes, specs,
                                     cost_model, calibration, args)
                print(f"  {label} done at {time.perf_counter() - started:.0f} s", flush=True)
    padding = None
    if not args.no_padding and time.perf_counter() - started <= args.budget_s:
        padding = _padding(precisions, modes, cost_model, args)
    scores = {mode: _scores([r for r in rows if r.mode == mode]) for mode in modes}
    scores["all"] = _scores(rows)
    _print_table(calibration, rows, scores, crossover, padding, skipped, cost_model)
    total_s = time.perf_counter() - started
    print(f"total {total_s:.0f} s")
    payload = {"environment": environment, "calibration": {f"{m} {p}": c for (m, p), c in calibration.items()},
               "rows": [{**dataclasses.asdict(r), "ratio": r.ratio(), "ok": r.ok} for r in rows],
               "scores": scores, "premerge_ffn_crossover": crossover, "padding": padding,
               "skipped_for_budget": skipped, "total_s": total_s}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    print(f"wrote {args.json}")


def _calibrate(mode: str, precisions: list[str], cost_model, args) -> dict[tuple[str, str], dict]:
    """Per (mode, precision): the fitted profile's figures and, where it beats the roofline on the held-out
    micro-benchmarks, the calibrated model (else the roofline stays, as ``tfcompile calibrate`` decides)."""
    sizes: SuiteSizes | None = QUICK_SIZES if args.quick and args.device == "cpu" else None
    results = {}
    for precision in precisions:
        options = {"device": args.device, "mode": mode, "precision": precision}
        started = time.perf_counter()
        try:
            profile, run = calibrate_torch(cost_model.device.name, options, repeat=args.repeat,
                                           suite=device_suite(args.device, sizes))
        except TfcompileError as exc:
            results[(mode, precision)] = {"refused": str(exc)}
            continue
        kept = improves_on_roofline(profile)
        results[(mode, precision)] = {
            "samples": len(run.samples), "skipped": run.skipped, "fit_mape": profile.fit_mape,
            "heldout_mape": profile.heldout_mape, "heldout_roofline_mape": profile.heldout_roofline_mape,
            "used": "calibrated" if kept else "roofline (held-out check failed)",
            "seconds": time.perf_counter() - started,
            "saved": str(save_profile(profile)) if kept and args.save_profiles else None,
            "model": CalibratedCostModel(cost_model.device, "torch", profile), "kept": kept}
    return results


def _predict_all(graph, mode: str, precision: str, cost_model, calibration: dict) -> dict[str, float]:
    """ms per predictor: the roofline always; calibrated (the roofline where the fit failed its check) and
    FLOPs-only where this mode and precision were calibrated."""
    predicted = {"roofline": _predict_ms(graph, mode, cost_model)}
    fitted = calibration.get((mode, precision), {})
    if "model" in fitted:
        model = fitted["model"]
        predicted["calibrated"] = model.predict(graph).latency_s * 1e3 if fitted["kept"] else predicted["roofline"]
        predicted["flops_only"] = model.profile.predict_flops_only_s(graph) * 1e3
    return predicted


def _check_shape(model: str, batch: int, seq: int | None, precisions, modes, specs, cost_model, calibration,
                 args) -> list[Row]:
    options = LoadOptions(batch=batch, seq=seq or 128, seed=0, config_overrides=TINY[model] if args.quick else None)
    graph = load_model(model, options)
    reference = graph.run()  # the variants are exact rewrites: one reference for all
    rows, lowered = [], {}
    for spec in specs:
        variant = build_variant(graph, spec).graph if spec.passes else graph
        for precision in precisions:
            try:
                cast = cast_graph(variant, precision)
            except TfcompileError as exc:
                rows += [Row(model, batch, seq, precision, m, spec.name, refused=str(exc)) for m in modes]
                continue
            for mode in modes:
                row = Row(model, batch, seq, precision, mode, spec.name,
                          predicted_ms=_predict_all(cast, mode, precision, cost_model, calibration))
                rows.append(row)
                try:
                    low = lower_device(variant, device=args.device, mode=mode, precision=precision,
                                       reference=reference, cast=cast, check=False)
                except TfcompileError as exc:
                    row.refused = str(exc)
                    continue
                row.max_rel_err, row.tolerance = low.max_rel_err, low.tolerance
                lowered[(spec.name, precision, mode)] = (row, low)
    if lowered:
        timed = measure_device({key: low for key, (_, low) in lowered.items()}, warmup=args.warmup,
                               repeat=args.repeat, max_total_s=args.max_shape_s)
        for key, (row, _) in lowered.items():
            spread = timed[key].spread
            row.measured_ms, row.p10_ms, row.p90_ms = spread.median, spread.p10, spread.p90
    del lowered
    _free(args.device)
    return rows


class _DenseFFN(torch.nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _crossover(mode: str, precision: str, cost_model, calibration: dict, args) -> dict:
    """Low-rank FFN (what premerge_ffn merges) against dense (its merged shape) over T: measured, predicted
    by each predictor, and premerge_ffn's own choice with the calibrated model (else the roofline)."""
    from tfcompile.cost_models.model import RooflineCostModel
    from tfcompile.passes import PassContext, apply_pass

    d, hidden = (int(v) for v in args.ffn.lower().split("x"))
    fitted = calibration.get((mode, precision), {})
    chooser = fitted["model"] if fitted.get("kept") else RooflineCostModel(cost_model.device, "torch")
    result = {"d": d, "hidden": hidden, "mode": mode, "precision": precision, "chooser": chooser.label, "rows": []}
    for tokens in [int(t) for t in _list(args.ffn_tokens)]:
        x = torch.randn(1, tokens, d, generator=torch.Generator().manual_seed(tokens))
        dense = export_module(_DenseFFN(d, hidden), (x,), name=f"ffn dense T{tokens}")
        lowrank, outcome = apply_pass(dense, "structure_ffn", rank_ratio=0.25, every_projection=True)
        if not outcome.applied:
            result["refused"] = f"structure_ffn did not apply: {outcome.reason}"
            return result
        row = {"tokens": tokens, "measured_ms": {}, "predicted_ms": {}}
        lowered = {}
        try:
            for name, graph in (("dense", dense), ("lowrank", lowrank)):
                cast = cast_graph(graph, precision)
                lowered[name] = lower_device(graph, device=args.device, mode=mode, precision=precision, cast=cast,
                                             check=False)
                for predictor, ms in _predict_all(cast, mode, precision, cost_model, calibration).items():
                    row["predicted_ms"].setdefault(predictor, {})[name] = ms
            merged, merge = apply_pass(cast_graph(lowrank, precision), "premerge_ffn",
                                       context=PassContext(chooser))
        except TfcompileError as exc:
            result["refused"] = str(exc)
            return result
        row["premerge_ffn"] = "merges" if merge.applied and merged is not lowrank else "keeps low-rank"
        timed = measure_device(lowered, warmup=args.warmup, repeat=args.repeat, max_total_s=args.max_shape_s / 4)
        row["measured_ms"] = {name: m.median_ms for name, m in timed.items()}
        result["rows"].append(row)
        del lowered
        _free(args.device)
    result["crossover_tokens"] = {"measured": _crossover_tokens(result["rows"], lambda r: r["measured_ms"])}
    for predictor in PREDICTORS:
        if all(predictor in r["predicted_ms"] for r in result["rows"]):
            result["crossover_tokens"][predictor] = _crossover_tokens(
                result["rows"], lambda r, p=predictor: r["predicted_ms"][p])
    return result


def _crossover_tokens(rows: list[dict], figures) -> int | None:
    """Smallest T from which the low-rank form is faster at every larger T (None: dense wins at the last)."""
    cross = None
    for row in reversed(rows):
        if figures(row)["lowrank"] >= figures(row)["dense"]:
            break
        cross = row["tokens"]
    return cross


# Packed forms of the padded batch: (label, pass, knobs). remove_padding's per-length loop launches an
# attention per run of equal lengths; both varlen forms launch one tfcompile::varlen_attention per layer,
# the static one with constant offsets (capturable in a CUDA graph), the run-time one reading the mask
# (its nonzero syncs the host, so CUDA-graph capture refuses it).
PACKED_FORMS = (("per-length", "remove_padding", {}), ("varlen", "remove_padding", {"attention": "varlen"}),
                ("varlen-rt", "remove_padding_varlen", {}))


def _padding(precisions, modes, cost_model, args) -> dict:
    """bert-base batch 8 at the longest --seqs (tiny: batch 4), lengths uniform in [16, seq]: padded and packed.

    The packed forms are built for torch on a GPU (the varlen passes refuse other runtimes) and run on
    ``--device``, so the CPU dry run exercises them too. Ideal: padded tokens over valid tokens."""
    from tfcompile.passes import PassContext, Workload, apply_pass
    from tfcompile.passes.padding import with_lengths

    batch, seq = (4, 64) if args.quick else (8, max(int(s) for s in _list(args.seqs)))
    rng = random.Random(0)
    lengths = [rng.randint(min(16, seq), seq) for _ in range(batch)]
    options = LoadOptions(batch=batch, seq=seq, seed=0, config_overrides=TINY["bert-base"] if args.quick else None)
    padded = with_lengths(load_model("bert-base", options), lengths)
    build = PassContext(cost_model_for("h100", "torch", calibrated=False), Workload(lengths=tuple(lengths)))
    graphs, refused = {"padded": padded}, {}
    for label, name, knobs in PACKED_FORMS:
        graph, outcome = apply_pass(padded, name, context=build, **knobs)
        if outcome.applied:
            graphs[label] = graph
        else:
            refused[label] = outcome.reason
    result = {"batch": batch, "seq": seq, "lengths": lengths, "ideal_speedup": batch * seq / sum(lengths),
              "refused_forms": refused, "runs": []}
    references = {label: graph.run() for label, graph in graphs.items()}
    for precision in _list(args.padding_precisions):
        for mode in modes:
            lowered, predicted, failed = {}, {}, {}
            for label, graph in graphs.items():
                try:
                    cast = cast_graph(graph, precision)
                    lowered[label] = lower_device(graph, device=args.device, mode=mode, precision=precision,
                                                  reference=references[label], cast=cast, check=False)
                    predicted[label] = _predict_ms(cast, mode, cost_model)
                except Exception as exc:  # noqa: BLE001 - a form this torch cannot run or capture is reported
                    failed[label] = f"{type(exc).__name__}: {first_line(exc)}"
            run = {"precision": precision, "mode": mode, "failed": failed}
            if "padded" in lowered and len(lowered) > 1:
                timed = measure_device(lowered, warmup=args.warmup, repeat=args.repeat,
                                       max_total_s=args.max_shape_s)
                run.update({
                    "measured_ms": {k: m.median_ms for k, m in timed.items()}, "predicted_ms": predicted,
                    "max_rel_err": {k: low.max_rel_err for k, low in lowered.items()},
                    "tolerance": {k: low.tolerance for k, low in lowered.items()},
                    "measured_speedup": {k: timed["padded"].median_s / m.median_s
                                         for k, m in timed.items() if k != "padded"},
                    "predicted_speedup": {k: predicted["padded"] / p for k, p in predicted.items() if k != "padded"}})
                run["of_ideal"] = {k: v / result["ideal_speedup"] for k, v in run["measured_speedup"].items()}
            result["runs"].append(run)
            del lowered
            _free(args.device)
    return result


def _cost_model(args):
    from tfcompile.cost_models import load_device

    device = load_device(args.target or ("h100" if args.device == "cuda" else "cpu"))
    if args.mem_bandwidth_gbps:
        device = dataclasses.replace(device, mem_bandwidth_bytes_per_s=args.mem_bandwidth_gbps * 1e9)
    return cost_model_for(device, "torch", calibrated=False)


def _predict_ms(graph, mode: str, cost_model) -> float:
    if mode == "graphs":
        device = dataclasses.replace(cost_model.device, kernel_overhead_s=REPLAY_OVERHEAD_S)
        return cost_model_for(device, "torch", calibrated=False).predict(graph).latency_s * 1e3
    return cost_model.predict(graph).latency_s * 1e3


def _scores(rows: list[Row]) -> dict[str, dict]:
    """Per predictor: MAPE, share within ±10 % and Kendall τ-b of measured against predicted, over the
    measured rows that predictor covers."""
    scores = {}
    for predictor in PREDICTORS:
        pairs = [(r.predicted_ms[predictor], r.measured_ms) for r in rows
                 if r.measured_ms and r.predicted_ms.get(predictor)]
        if not pairs:
            continue
        errors = [abs(p - m) / m for p, m in pairs]
        scores[predictor] = {"n": len(pairs), "mape": sum(errors) / len(errors),
                             "within_10pct": sum(e <= 0.10 for e in errors) / len(errors),
                             "kendall_tau": _kendall_tau([p for p, _ in pairs], [m for _, m in pairs])}
    return scores


def _kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's τ-b (scipy.stats.kendalltau's default), without SciPy."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else float("nan")


def _print_table(calibration: dict, rows: list[Row], scores: dict, crossover: dict | None, padding: dict | None,
                 skipped: list[str], cost_model) -> None:
    print(f"\n(a) calibration on {cost_model.device.name} (micro-benchmarks; held out: every 4th, fitted without)")
    for (mode, precision), c in calibration.items():
        if "refused" in c:
            print(f"  {mode:<7}{precision:<5} refused: {c['refused']}")
            continue
        print(f"  {mode:<7}{precision:<5} n={c['samples']:<3} fit MAPE {c['fit_mape']:6.1%}   held-out MAPE "
              f"{c['heldout_mape']:6.1%} (roofline {c['heldout_roofline_mape']:6.1%})   uses {c['used']}"
              f"   {c['seconds']:.0f} s" + (f"   skipped {len(c['skipped'])}" if c["skipped"] else ""))
    print(f"\n(b) compare: predicted (calibrated, roofline: {cost_model.device.name} datasheet with graphs rows at "
          f"{REPLAY_OVERHEAD_S * 1e6:.2f} us per kernel, FLOPs-only) against measured")
    print(f"{'model':<11}{'b':>3}{'seq':>5} {'variant':<18}{'prec':<5}{'mode':<7}{'meas ms':>9}{'cal ms':>9}"
          f"{'roof ms':>9}{'flops ms':>9}{'p10-p90':>15}{'err':>9}  check")
    for r in rows:
        head = f"{r.model:<11}{r.batch:>3}{r.seq or '-':>5} {r.variant:<18}{r.precision:<5}{r.mode:<7}"
        if r.refused:
            print(f"{head}  refused: {r.refused}")
            continue
        figures = "".join(f"{r.predicted_ms[p]:>9.3f}" if p in r.predicted_ms else f"{'-':>9}" for p in PREDICTORS)
        spread = f"{r.p10_ms:.3f}-{r.p90_ms:.3f}"
        print(f"{head}{r.measured_ms:>9.3f}{figures}{spread:>15}{r.max_rel_err:>9.1e}  "
              f"{'ok' if r.ok else 'FAIL > %.0e' % r.tolerance}")
    for mode, by_predictor in scores.items():
        for predictor, score in by_predictor.items():
            print(f"{mode:<7}{predictor:<11} n={score['n']:<3} MAPE {score['mape']:7.1%}   within ±10 % "
                  f"{score['within_10pct']:5.1%}   Kendall τ {score['kendall_tau']:.3f}")
    if crossover:
        print(f"\n(c) premerge_ffn crossover: FFN {crossover['d']}x{crossover['hidden']}, low-rank (r = d/4) against "
              f"dense, {crossover['mode']} {crossover['precision']}; premerge_ffn decides with {crossover['chooser']}")
        if "refused" in crossover:
            print(f"  refused: {crossover['refused']}")
        for r in crossover["rows"]:
            m = r["measured_ms"]
            predicted = "   ".join(f"{p} {f['dense']:.3f}/{f['lowrank']:.3f}" for p, f in r["predicted_ms"].items())
            print(f"  T={r['tokens']:<6} measured dense/low-rank {m['dense']:.3f}/{m['lowrank']:.3f} ms   "
                  f"predicted {predicted}   premerge_ffn {r['premerge_ffn']}")
        for source, tokens in crossover.get("crossover_tokens", {}).items():
            where = f"low-rank faster from T={tokens}" if tokens else "dense faster at the largest T"
            print(f"  crossover {source:<11} {where}")
    if padding:
        print(f"\npadding removal, bert-base b{padding['batch']} s{padding['seq']}, lengths {padding['lengths']}: "
              f"ideal speed-up {padding['ideal_speedup']:.2f}x (padded tokens / valid tokens)")
        for label, reason in padding["refused_forms"].items():
            print(f"  {label}: not built ({reason})")
        for run in padding["runs"]:
            head = f"  {run['precision']:<5}{run['mode']:<8}"
            for label, reason in run["failed"].items():
                print(f"{head}{label:<11} did not run: {reason}")
            if "measured_ms" not in run:
                continue
            m, p = run["measured_ms"], run["predicted_ms"]
            print(f"{head}{'padded':<11} measured {m['padded']:9.3f} ms   predicted {p['padded']:9.3f} ms")
            for label, speedup in run["measured_speedup"].items():
                err = run["max_rel_err"][label]
                check = "ok" if err <= run["tolerance"][label] else f"FAIL > {run['tolerance'][label]:.0e}"
                print(f"{head}{label:<11} measured {m[label]:9.3f} ms ({speedup:.2f}x, {run['of_ideal'][label]:.2f} "
                      f"of ideal)   predicted {p[label]:9.3f} ms ({run['predicted_speedup'][label]:.2f}x)   {check}")
    if skipped:
        print(f"\nnot started (--budget-s spent): {', '.join(skipped)}")


def _jsonable(value):
    """The payload without the cost-model objects the calibration results carry."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if k != "model"}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _environment(args, cost_model) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": args.device, "target": cost_model.device.name,
           "mem_bandwidth_gbps": cost_model.device.mem_bandwidth_bytes_per_s / 1e9, "quick": args.quick}
    if args.device == "cuda" and torch.cuda.is_available():
        env |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
        if "H200" in env["gpu"] and not args.mem_bandwidth_gbps:
            print("note: an H200 moves 4.8 TB/s (HBM3e); --mem-bandwidth-gbps 4800 predicts with it")
    return env


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


if __name__ == "__main__":
    main()
