"""Cost-model accuracy on this CPU: calibrate, then predict held-out variants.

Calibration sees only micro-benchmarks (GEMMs, SDPA, norms, softmax, GELU,
launch chains, synthetic transformer blocks of widths no zoo model has);
every zoo variant below is held out. The variants of one config are measured
round-robin (median of repeated runs), in ``--passes`` passes over all
configs (the lowest median counts: the shared host's load only adds time),
and predicted three ways: calibrated, uncalibrated roofline, FLOPs-only.
Prints MAPE, share within ±10 % and Kendall τ per predictor; writes JSON and
a scatter PNG under benchmarks/results/.

    .venv/bin/python benchmarks/cost_model_accuracy.py --backend ort
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from rich.console import Console

from tfcompile.compare import ComparisonRow, lowest_of_passes, measure_and_predict, score, speedup_scores, write_outputs
from tfcompile.cost_models.calibration import fit_checked, save_profile
from tfcompile.cost_models.device import detect_host, host_identity
from tfcompile.cost_models.model import cost_model_for
from tfcompile.calibrate import default_suite, run_suite
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.variants import BUILTIN_VARIANTS, build_variant

# (model, batch, seq); vit-base ignores seq.
CONFIGS = [
    ("bert-base", 1, 64), ("bert-base", 1, 128), ("bert-base", 1, 256), ("bert-base", 4, 128),
    ("gpt2-small", 1, 64), ("gpt2-small", 1, 128),
    ("vit-base", 1, 0),
    ("minilm", 1, 128), ("minilm", 8, 128),
    ("llama-tiny", 1, 128), ("llama-tiny", 1, 512),
]


def config_variants(model: str, batch: int, seq: int) -> list:
    """The built-in variants of one (model, batch, seq) that differ from each other."""
    original = load_model(model, LoadOptions(batch=batch, seq=seq or 128))
    graphs = []
    for spec in BUILTIN_VARIANTS:
        variant = build_variant(original, spec)
        if spec.passes and not variant.applied_passes:
            continue
        if spec.name == "cleanup+merge_qkv" and "merge_qkv_projections" not in variant.applied_passes:
            continue  # identical to the cleanup variant
        variant.graph.name = f"{model} b{batch}" + (f" s{seq}" if seq else "") + f" {spec.name}"
        graphs.append(variant.graph)
    return graphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["ort", "tvm", "torch"], default="ort")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--passes", type=int, default=2,
                        help="measure every config this many times, minutes apart; keep each variant's lowest median")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    console = Console()
    started = time.time()

    with console.status("calibrating") as status:
        samples = run_suite(default_suite(), args.backend, repeat=args.repeat,
                            progress=lambda m: status.update(f"calibrating {m}"))
    host = detect_host()
    profile = fit_checked(samples, "cpu", args.backend, host=f"{host.model}, {host.cores} cores",
                          host_id=host_identity())
    args.out.mkdir(parents=True, exist_ok=True)
    profile_file = save_profile(profile, args.out / f"profile-cpu-{args.backend}.json")
    console.print(f"calibration: {len(samples)} micro-benchmarks, fit MAPE {profile.fit_mape:.1%}; held out: "
                  f"{profile.heldout_mape:.1%} (roofline {profile.heldout_roofline_mape:.1%})")
    # The profile just fitted, read back from its file: what a later run with this profile predicts.
    cost_model = cost_model_for("cpu", args.backend, profile_path=profile_file)

    measured_by_pass: list[list[ComparisonRow]] = []
    with console.status("measuring") as status:
        for pass_index in range(args.passes):
            rows_of_pass = []
            # One config's variants at a time, freed before the next config's are built.
            for model, batch, seq in CONFIGS:
                status.update(f"pass {pass_index + 1}/{args.passes}: {model} b{batch} s{seq}: building variants")
                graphs = config_variants(model, batch, seq)
                for row in measure_and_predict(graphs, cost_model=cost_model, repeat=args.repeat,
                                               progress=lambda m: status.update(f"pass {pass_index + 1}: {m}"),
                                               group_key=lambda graph: (model, batch, seq)):
                    rows_of_pass.append(row)
                del graphs
                gc.collect()
            measured_by_pass.append(rows_of_pass)
    rows = lowest_of_passes(measured_by_pass)
    scores = score(rows)
    for row in rows:
        cells = "  ".join(f"{k} {v:9.2f} ({(v - row.measured_ms) / row.measured_ms:+5.0%})"
                          for k, v in row.predicted_ms.items())
        console.print(f"{row.name:38s} measured {row.measured_ms:9.2f} ms  {cells}")
    for predictor, s in scores.items():
        console.print(f"{predictor:10s} MAPE {s['mape']:6.1%}  within ±10% {s['within_10pct']:5.0%}  "
                      f"Kendall tau {s['kendall_tau']:.3f}  (n={len(rows)})")
    speedups = speedup_scores(rows)
    for predictor, s in speedups.items():
        worst = s["worst"]
        console.print(f"{predictor:10s} speed-up error median {s['median_error_pp']:.1f} points over "
                      f"{s['variants']} variants; furthest off {worst['variant']}: predicted "
                      f"{worst['predicted_speedup']:.2f}x, measured {worst['measured_speedup']:.2f}x")
    title = f"cpu/{args.backend}: {len(rows)} held-out variants"
    write_outputs(rows, scores, args.out / f"cost-model-{args.backend}", title=title)
    (args.out / f"cost-model-{args.backend}" / "summary.json").write_text(json.dumps(
        {"host": profile.host, "host_id": profile.host_id, "calibration_fit_mape": profile.fit_mape,
         "heldout_mape": profile.heldout_mape, "heldout_roofline_mape": profile.heldout_roofline_mape,
         "scores": scores, "speedups": speedups,
         "passes": [{row.name: row.measured_ms for row in p} for p in measured_by_pass],
         "wall_s": time.time() - started}, indent=2) + "\n")
    console.print(f"wrote {args.out / f'cost-model-{args.backend}'} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
