"""Dense vs low-rank FFN on ONNX Runtime CPU, measured against the cost model's choice.

One FFN block (fc1 → GELU → fc2, fp32) per width, traced at each token count
T (input [1, T, d]). The low-rank form is what ``structure_ffn`` writes with
``--rank-ratio`` (default 0.25: r = d/4 for both projections, 2 GEMMs each,
0.3125 of the dense FLOPs). Both forms are lowered with ``runner.lower(graph, "ort", ...)``,
their ORT outputs checked against torch, and timed interleaved in this
process (median of repeated runs after warm-up).

Reported per width: measured latency of each form at each T, the measured
crossover (smallest T from which low-rank stays faster), the predicted
crossover (``cost_models.ffn.choose_ffn_form``: roofline on ``cpu`` and, if a
profile exists, the calibrated cpu/ort profile), and the share of
(width, T) cases where the cost model's choice (the same estimators the
variant search uses, applied to the two traced graphs) matches the faster
measured form.

    python benchmarks/structured_ffn.py [--shapes 768x3072 384x1536 1024x4096]
        [--tokens 1 4 16 64 256 1024 4096] [--rank-ratio 0.25] [--budget-s 1.5] [--profile PATH]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tfcompile.backends.ort import default_threads
from tfcompile.backends.runner import lower
from tfcompile.backends.timing import ORT_BLOCK, measure_interleaved
from tfcompile.cost_models.ffn import choose_ffn_form
from tfcompile.cost_models.model import CostModel, cost_model_for
from tfcompile.graph import export_module
from tfcompile.passes import apply_pass
from tfcompile.verify import compare_outputs

class DenseFFN(torch.nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _faster(dense_s: float, lowrank_s: float) -> str:
    return "lowrank" if lowrank_s < dense_s else "dense"


def _measured_crossover(rows) -> int | None:
    """Smallest measured T from which low-rank is faster at every larger T."""
    cross = None
    for row in reversed(rows):
        if row["lowrank_ms"] >= row["dense_ms"]:
            break
        cross = row["tokens"]
    return cross


def bench_shape(d: int, hidden: int, ratio: float, tokens: list[int], budget_s: float, workdir: Path,
                roofline: CostModel, calibrated: CostModel | None):
    torch.manual_seed(0)
    module = DenseFFN(d, hidden).eval()
    rank = int(ratio * d)
    rows = []
    for t in tokens:
        x = torch.randn(1, t, d, generator=torch.Generator().manual_seed(t))
        dense = export_module(module, (x,), name=f"dense_{d}_{t}")
        lowrank, outcome = apply_pass(dense, "structure_ffn", rank_ratio=ratio, every_projection=True)
        if not outcome.applied:
            raise RuntimeError(f"structure_ffn did not apply: {outcome.reason}")
        rank = outcome.record.projections[0].rank  # ratio · d, rounded up to a multiple of 8
        lowrank.name = f"lowrank_{d}_{t}"
        runs = {}
        for name, graph in (("dense", dense), ("lowrank", lowrank)):
            lowered = lower(graph, "ort", workdir)
            check = compare_outputs(graph.run(), lowered.outputs)
            if check.max_rel_err > 1e-4:
                raise RuntimeError(f"{graph.name}: ORT differs from torch by {check.max_rel_err:.1e}")
            runs[name] = lowered.run
        # Repeats: as many as fit the time budget per token count, at least 5.
        start = time.perf_counter()
        runs["dense"]()
        runs["lowrank"]()
        once = time.perf_counter() - start
        repeat = max(5, min(200, int(budget_s / max(once, 1e-6))))
        measured = measure_interleaved(runs, backend="ort", warmup=2, repeat=repeat, block=ORT_BLOCK)
        row = {"tokens": t, "repeat": repeat,
               "dense_ms": measured["dense"].median_ms, "lowrank_ms": measured["lowrank"].median_ms,
               "roof_dense_ms": roofline.predict(dense).latency_s * 1e3,
               "roof_lowrank_ms": roofline.predict(lowrank).latency_s * 1e3}
        if calibrated is not None:
            row["cal_dense_ms"] = calibrated.predict(dense).latency_s * 1e3
            row["cal_lowrank_ms"] = calibrated.predict(lowrank).latency_s * 1e3
        rows.append(row)
        for path in workdir.glob("*.onnx"):
            path.unlink()  # 16 MB+ each at the larger widths
    predicted = {"roofline": choose_ffn_form(d, hidden, rank, 1, roofline).crossover_tokens}
    if calibrated is not None:
        predicted["calibrated"] = choose_ffn_form(d, hidden, rank, 1, calibrated).crossover_tokens
    return rank, rows, predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["768x3072", "384x1536", "1024x4096"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--rank-ratio", type=float, default=0.25, help="r = ratio · d (both projections)")
    parser.add_argument("--budget-s", type=float, default=1.5, help="timing budget per (shape, T) for both forms")
    parser.add_argument("--profile", type=Path, help="calibration profile JSON "
                        "(default: the cpu/ort profile in the profile directory, if any)")
    args = parser.parse_args()

    roofline = cost_model_for("cpu", calibrated=False)
    # The cpu/ort profile (--profile, else the default one); None, and no calibrated column, when there is none.
    calibrated = cost_model_for("cpu", "ort", profile_path=args.profile)
    if calibrated.kind != "calibrated":
        calibrated = None
    profile = calibrated.profile if calibrated is not None else None
    print(f"ORT CPU, {default_threads()} threads; cpu spec: {roofline.device.description}; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"calibrated profile: {'none' if profile is None else f'{profile.host}, {profile.created}'}")
    matches = {"roofline": [], "calibrated": []}
    with tempfile.TemporaryDirectory(prefix="tfcompile-ffn-") as tmp:
        for shape in args.shapes:
            d, hidden = (int(v) for v in shape.split("x"))
            rank, rows, predicted = bench_shape(d, hidden, args.rank_ratio, args.tokens, args.budget_s, Path(tmp),
                                                roofline, calibrated)
            print(f"\n=== FFN d={d}, hidden={hidden}, GELU; low-rank r={rank} (both projections; "
                  f"{rank * (d + hidden) / (d * hidden):.4f} of the dense FLOPs)")
            header = f"{'T':>5} {'dense ms':>10} {'lowrank ms':>10} {'speedup':>8} {'roof d/l ms':>17} "
            header += f"{'cal d/l ms':>17} " if profile is not None else ""
            print(header + f"{'faster':>8} {'roof':>8}" + (f" {'cal':>8}" if profile is not None else ""))
            for r in rows:
                fastest = _faster(r["dense_ms"], r["lowrank_ms"])
                roof = _faster(r["roof_dense_ms"], r["roof_lowrank_ms"])
                matches["roofline"].append(roof == fastest)
                line = (f"{r['tokens']:>5} {r['dense_ms']:>10.3f} {r['lowrank_ms']:>10.3f} "
                        f"{r['dense_ms'] / r['lowrank_ms']:>7.2f}x "
                        f"{r['roof_dense_ms']:>8.3f}/{r['roof_lowrank_ms']:<8.3f} ")
                if profile is not None:
                    cal = _faster(r["cal_dense_ms"], r["cal_lowrank_ms"])
                    matches["calibrated"].append(cal == fastest)
                    line += f"{r['cal_dense_ms']:>8.3f}/{r['cal_lowrank_ms']:<8.3f} "
                line += f"{fastest:>8} {roof:>8}" + (f" {cal:>8}" if profile is not None else "")
                print(line)
            print(f"crossover (smallest T with low-rank faster): measured {_measured_crossover(rows)} "
                  f"(among {args.tokens}); predicted " + ", ".join(f"{k} {v}" for k, v in predicted.items()))
    print()
    for name, hits in matches.items():
        if hits:
            print(f"cost model ({name}) picks the measured faster form in {sum(hits)}/{len(hits)} "
                  f"cases ({100 * sum(hits) / len(hits):.0f}%)")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
