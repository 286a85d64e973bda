"""GPU check (issue 24): zoo models measured with the torch device backend against the cost model, one table.

For bert-base, gpt2-small, vit-base and llama-tiny (seeded weights), batch 1
and 8, sequence 128 and 512 (vit-base: its 224x224 image), fp32 and bf16, in
eager and CUDA-graph replay (``--compile`` adds torch.compile): each shape's
runs are checked against the CPU fp32 reference and timed round-robin (CUDA
events, median after warm-up); the cost model predicts each at its own dtypes.
Prints one table (predicted, measured, measured/predicted, error against fp32)
and MAPE / share within ±10 % / Kendall τ per mode, then padding removal on
bert-base (batch 8, lengths uniform in [16, seq], seed 0): padded against
packed, measured and predicted. Writes everything to ``--json``.

Graph-replay rows are predicted with the replay launch cost (devices.md §3:
0.98 µs per kernel) instead of the target's eager per-kernel overhead; the
other rows with the target's spec as shipped.

On an H100/H200 (about 5 minutes; ``--budget-s`` stops starting new shapes):

    python benchmarks/gpu_check.py --json gpu_check.json

In CI or on a laptop (tiny configs, two shapes, under 2 minutes on 2 cores):

    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick

Imports neither ONNX Runtime nor TVM; SciPy is optional (see ``_scipy_optional``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.machinery
import json
import math
import platform
import random
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's source, uninstalled


def _scipy_optional() -> None:
    """cost_models.calibration imports scipy.optimize.nnls at import, for fitting profiles, which this script
    never does; a GPU machine without SciPy gets a stand-in that says so if it is ever called."""
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        import transformers.utils.import_utils  # noqa: F401 - looks for scipy at import: before the stand-in

        def nnls(*_args, **_kwargs):
            raise RuntimeError("scipy is not installed here; calibration needs it")

        stand_ins = {name: types.ModuleType(name) for name in ("scipy", "scipy.optimize")}
        for name, module in stand_ins.items():
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        stand_ins["scipy"].optimize = stand_ins["scipy.optimize"]
        stand_ins["scipy.optimize"].nnls = nnls
        sys.modules.update(stand_ins)


_scipy_optional()

from tfcompile.backends.torch_device import MODES, PRECISIONS, cast_graph, lower_device, measure_device  # noqa: E402
from tfcompile.cost_models.model import cost_model_for  # noqa: E402
from tfcompile.errors import TfcompileError  # noqa: E402
from tfcompile.frontend import LoadOptions, load_model, zoo  # noqa: E402

MODELS = ["bert-base", "gpt2-small", "vit-base", "llama-tiny"]
REPLAY_OVERHEAD_S = 0.98e-6  # devices.md §3, H100 CUDA-graph replay per kernel (M*)
# --quick: the test suite's tiny configs, which keep each architecture.
TINY = zoo.TINY_CONFIGS


@dataclasses.dataclass
class Row:
    model: str
    batch: int
    seq: int | None
    precision: str
    mode: str
    predicted_ms: float | None = None
    measured_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    max_rel_err: float | None = None
    tolerance: float | None = None
    refused: str | None = None

    @property
    def ratio(self) -> float | None:
        return self.measured_ms / self.predicted_ms if self.measured_ms and self.predicted_ms else None

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
    parser.add_argument("--modes", default="eager,graphs")
    parser.add_argument("--compile", action="store_true", help="add torch.compile (Inductor) to the modes")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--max-shape-s", type=float, default=10.0, help="timing budget per shape")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new shape after this long")
    parser.add_argument("--no-padding", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny configs, two shapes, 5 runs")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    if args.quick:  # tiny shapes and fewer runs, unless given
        for name, value in (("batches", "1,2"), ("seqs", "32"), ("repeat", 5), ("warmup", 1)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    started = time.perf_counter()
    modes = [m for m in _list(args.modes) + (["compile"] if args.compile else []) if m in MODES]
    precisions = [p for p in _list(args.precisions) if p in PRECISIONS]
    cost_model = _cost_model(args)
    environment = _environment(args, cost_model)
    print(" | ".join(f"{k} {v}" for k, v in environment.items()), flush=True)

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
                rows += _check_shape(model, batch, None if model == "vit-base" else seq, precisions, modes,
                                     cost_model, args)
                print(f"  {label} done at {time.perf_counter() - started:.0f} s", flush=True)
    padding = None
    if not args.no_padding and time.perf_counter() - started <= args.budget_s:
        padding = _padding(precisions, modes, cost_model, args)
    scores = {mode: _score([r for r in rows if r.mode == mode]) for mode in modes}
    scores["all"] = _score(rows)
    _print_table(rows, scores, padding, skipped, cost_model)
    total_s = time.perf_counter() - started
    print(f"total {total_s:.0f} s")
    payload = {"environment": environment, "rows": [{**dataclasses.asdict(r), "ratio": r.ratio, "ok": r.ok}
                                                     for r in rows],
               "scores": scores, "padding": padding, "skipped_for_budget": skipped, "total_s": total_s}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")


def _check_shape(model: str, batch: int, seq: int | None, precisions, modes, cost_model, args) -> list[Row]:
    options = LoadOptions(batch=batch, seq=seq or 128, seed=0, config_overrides=TINY[model] if args.quick else None)
    graph = load_model(model, options)
    reference = graph.run()
    rows, lowered = [], {}
    for precision in precisions:
        try:
            cast = cast_graph(graph, precision)
        except TfcompileError as exc:
            rows += [Row(model, batch, seq, precision, m, refused=str(exc)) for m in modes]
            continue
        for mode in modes:
            row = Row(model, batch, seq, precision, mode, predicted_ms=_predict_ms(cast, mode, cost_model))
            rows.append(row)
            try:
                low = lower_device(graph, device=args.device, mode=mode, precision=precision, reference=reference,
                                   cast=cast, check=False)
            except TfcompileError as exc:
                row.refused = str(exc)
                continue
            row.max_rel_err, row.tolerance = low.max_rel_err, low.tolerance
            lowered[(precision, mode)] = (row, low)
    if lowered:
        timed = measure_device({key: low for key, (_, low) in lowered.items()}, warmup=args.warmup,
                               repeat=args.repeat, max_total_s=args.max_shape_s)
        for key, (row, _) in lowered.items():
            spread = timed[key].spread
            row.measured_ms, row.p10_ms, row.p90_ms = spread.median, spread.p10, spread.p90
    del lowered
    _free(args.device)
    return rows


def _padding(precisions, modes, cost_model, args) -> dict:
    """bert-base batch 8 at the longest --seqs (tiny: batch 4), lengths uniform in [16, seq]: padded and packed."""
    from tfcompile.passes import PassContext, Workload, apply_pass
    from tfcompile.passes.padding import with_lengths

    batch, seq = (4, 64) if args.quick else (8, max(int(s) for s in _list(args.seqs)))
    rng = random.Random(0)
    lengths = [rng.randint(min(16, seq), seq) for _ in range(batch)]
    options = LoadOptions(batch=batch, seq=seq, seed=0, config_overrides=TINY["bert-base"] if args.quick else None)
    padded = with_lengths(load_model("bert-base", options), lengths)
    packed, outcome = apply_pass(padded, "remove_padding", context=PassContext(cost_model, Workload(
        lengths=tuple(lengths))))
    result = {"batch": batch, "seq": seq, "lengths": lengths, "applied": outcome.applied, "reason": outcome.reason,
              "runs": []}
    if not outcome.applied:
        return result
    references = {"padded": padded.run(), "packed": packed.run()}
    for precision in precisions:
        for mode in modes:
            lowered, predicted = {}, {}
            try:
                for name, graph in (("padded", padded), ("packed", packed)):
                    cast = cast_graph(graph, precision)
                    lowered[name] = lower_device(graph, device=args.device, mode=mode, precision=precision,
                                                 reference=references[name], cast=cast, check=False)
                    predicted[name] = _predict_ms(cast, mode, cost_model)
            except TfcompileError as exc:
                result["runs"].append({"precision": precision, "mode": mode, "refused": str(exc)})
                continue
            timed = measure_device(lowered, warmup=args.warmup, repeat=args.repeat, max_total_s=args.max_shape_s)
            result["runs"].append({
                "precision": precision, "mode": mode,
                "measured_ms": {k: m.median_ms for k, m in timed.items()}, "predicted_ms": predicted,
                "measured_speedup": timed["padded"].median_s / timed["packed"].median_s,
                "predicted_speedup": predicted["padded"] / predicted["packed"]})
            del lowered
            _free(args.device)
    return result


def _cost_model(args):
    from tfcompile.cost_models import load_device

    device = load_device(args.target or ("h100" if args.device == "cuda" else "cpu"))
    if args.mem_bandwidth_gbps:
        device = dataclasses.replace(device, mem_bandwidth_bytes_per_s=args.mem_bandwidth_gbps * 1e9)
    return cost_model_for(device, "torch")


def _predict_ms(graph, mode: str, cost_model) -> float:
    if mode == "graphs":
        device = dataclasses.replace(cost_model.device, kernel_overhead_s=REPLAY_OVERHEAD_S)
        return cost_model_for(device, "torch", calibrated=False).predict(graph).latency_s * 1e3
    return cost_model.predict(graph).latency_s * 1e3


def _score(rows: list[Row]) -> dict:
    """MAPE, share within ±10 % and Kendall τ-b of measured against predicted, over the measured rows."""
    pairs = [(r.predicted_ms, r.measured_ms) for r in rows if r.measured_ms and r.predicted_ms]
    if not pairs:
        return {"n": 0}
    errors = [abs(p - m) / m for p, m in pairs]
    return {"n": len(pairs), "mape": sum(errors) / len(errors),
            "within_10pct": sum(e <= 0.10 for e in errors) / len(errors),
            "kendall_tau": _kendall_tau([p for p, _ in pairs], [m for _, m in pairs])}


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


def _print_table(rows: list[Row], scores: dict, padding: dict | None, skipped: list[str], cost_model) -> None:
    print(f"\npredicted: {cost_model.label} ({cost_model.device.name}); graphs rows with "
          f"{REPLAY_OVERHEAD_S * 1e6:.2f} us per kernel")
    print(f"{'model':<11}{'batch':>6}{'seq':>5} {'prec':<5}{'mode':<8}{'pred ms':>10}{'meas ms':>10}"
          f"{'p10-p90':>17}{'meas/pred':>10}{'err':>9}  check")
    for r in rows:
        head = f"{r.model:<11}{r.batch:>6}{r.seq or '-':>5} {r.precision:<5}{r.mode:<8}"
        if r.refused:
            print(f"{head}  refused: {r.refused}")
            continue
        spread = f"{r.p10_ms:.3f}-{r.p90_ms:.3f}"
        print(f"{head}{r.predicted_ms:>10.3f}{r.measured_ms:>10.3f}{spread:>17}{r.ratio:>9.2f}x"
              f"{r.max_rel_err:>9.1e}  {'ok' if r.ok else 'FAIL > %.0e' % r.tolerance}")
    for mode, score in scores.items():
        if score["n"]:
            print(f"{mode:<7} n={score['n']:<3} MAPE {score['mape']:6.1%}   within ±10 % {score['within_10pct']:5.1%}"
                  f"   Kendall τ {score['kendall_tau']:.3f}")
    if padding:
        print(f"\npadding removal, bert-base b{padding['batch']} s{padding['seq']}, lengths {padding['lengths']}: "
              + ("" if padding["applied"] else f"not applied ({padding['reason']})"))
        for run in padding["runs"]:
            if "refused" in run:
                print(f"  {run['precision']:<5}{run['mode']:<8} refused: {run['refused']}")
                continue
            m, p = run["measured_ms"], run["predicted_ms"]
            print(f"  {run['precision']:<5}{run['mode']:<8} measured {m['padded']:.3f} -> {m['packed']:.3f} ms "
                  f"({run['measured_speedup']:.2f}x)   predicted {p['padded']:.3f} -> {p['packed']:.3f} ms "
                  f"({run['predicted_speedup']:.2f}x)")
    if skipped:
        print(f"\nnot started (--budget-s spent): {', '.join(skipped)}")


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
