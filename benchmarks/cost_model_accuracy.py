"""Cost-model accuracy on this CPU: calibrate, then predict held-out variants and their speed-ups.

Calibration sees only micro-benchmarks (GEMMs, skinny GEMMs, SDPA up to 4096
tokens, norms, softmax, GELU, elementwise and launch chains, synthetic
transformer blocks of widths no zoo model has); every zoo variant below is
held out. ``--set full`` (the default) is issue 26's list: bert-base,
gpt2-small, vit-base, minilm and llama-tiny at batch 1-8 and 128-2048 tokens,
each config's baseline beside its cleanup, projection merges, norm rewrites
(LayerNorm -> RMSNorm -> CRMSNorm, RMSNorm fusion), padding removal on a
right-padded batch, local attention and token merging; ``quick`` every
family once at small shapes; ``issue8`` the 31 variants of the earlier
figures (baseline / cleanup / cleanup+merge_qkv at up to 512 tokens).

The variants of one config are measured round-robin (median of repeated
runs), in ``--passes`` passes over all configs (the lowest median counts: the
shared host's load only adds time), and predicted three ways: calibrated,
uncalibrated roofline, FLOPs-only. Prints MAPE, share within ±10 % and
Kendall τ per predictor, each variant's speed-up over its config's baseline
(predicted against measured), the same per pass family, and llama-tiny at 512
tokens' ``cleanup`` speed-up; writes JSON and a scatter PNG under
benchmarks/results/. Three of the calibration's own layer stacks are
timed as calibration timed them before and after every config
(``tfcompile.reference_speed``): their calibration time over their time then
is how fast the shared host ran around that config, and the same scores are
printed again with the measured times brought to calibration speed ("at
calibration speed"); the raw ones come first.

    .venv/bin/python benchmarks/cost_model_accuracy.py --backend ort
    .venv/bin/python benchmarks/cost_model_accuracy.py --set quick --repeat 2 --passes 1   # a smoke run
    .venv/bin/python benchmarks/cost_model_accuracy.py --models llama-tiny --profile PROFILE   # no calibration
    .venv/bin/python benchmarks/cost_model_accuracy.py --dry-run   # build every variant, measure nothing
    # A cost-model change judged on a run's own measurements: refit its profile, predict its variants again.
    .venv/bin/python benchmarks/cost_model_accuracy.py --replay RUN/cost-model-ort/summary.json \
        --profile RUN/profile-cpu-ort.json --refit --out NEW
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from tfcompile.backends.runner import interleave_block
from tfcompile.calibrate import calibrate_here, default_suite
from tfcompile.compare import (PREDICTORS, ComparisonRow, lowest_of_passes, measure_and_predict, measured_speedup,
                               predict_all, score, speedup_scores, write_outputs)
from tfcompile.cost_models.calibration import Profile, Sample, fit_checked, load_profile, save_profile
from tfcompile.cost_models.host_speed import probes_around, speed_record, speed_text
from tfcompile.cost_models.model import cost_model_for
from tfcompile.cli_output import show_explanations
from tfcompile.errors import BackendError, first_line
from tfcompile.explain import explain, explained_count, furthest_rows
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.graph import ModelGraph, export_module
from tfcompile.passes.padding import with_lengths
from tfcompile.reference_speed import at_calibration_speed, reference_layers
from tfcompile.variants import CLEANUP, Variant, VariantSpec, build_variant, extend_variant


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """One variant of a config: its pipeline, and the family its error is reported under."""

    name: str  # the row name's last word: speed-ups pair "<config> <name>" with "<config> baseline"
    family: str
    passes: tuple[str, ...]
    knobs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def own_passes(self) -> tuple[str, ...]:
        """The passes that make this variant what it is (those after the cleanup it starts from)."""
        return self.passes[len(CLEANUP):] if self.passes[:len(CLEANUP)] == CLEANUP else self.passes


BASELINE = HeldOut("baseline", "baseline", ())
CLEANED = HeldOut("cleanup", "cleanup", CLEANUP)
MERGE_QKV = HeldOut("cleanup+merge_qkv", "merges", CLEANUP + ("merge_qkv_projections",))
# Pre-LN models (gpt2-small, vit-base): the γ/β go into the linears first, then the stream is centred.
RMSNORM = HeldOut("cleanup+rmsnorm", "norm rewrites", CLEANUP + ("fold_norm_affine", "layernorm_to_rmsnorm"))
CRMSNORM = HeldOut("cleanup+crmsnorm", "norm rewrites", RMSNORM.passes + ("rmsnorm_to_crmsnorm",))
# Llama's RMSNorm is written out as pow/mean/rsqrt: fused into one op.
FUSE_NORM = HeldOut("cleanup+fuse_norm", "norm rewrites", CLEANUP + ("fuse_norm",))
REMOVE_PADDING = HeldOut("cleanup+remove_padding", "padding removal", CLEANUP + ("remove_padding",))
REMOVE_PADDING_RUNTIME = HeldOut("cleanup+remove_padding_runtime", "padding removal",
                                 CLEANUP + ("remove_padding_runtime",))
# Zero-TPrune after layer 0 with the dropped tokens merged into their nearest kept ones ("L0 0.65 sim merge",
# benchmarks/token_pruning.py: its best quality per FLOPs cut on minilm passages).
PRUNE_MERGE = HeldOut("cleanup+prune_merge", "token merging", CLEANUP + ("prune_tokens",),
                      {"prune_tokens": {"keep_ratio": 0.65, "layers": [0], "sim_fraction": 1.0, "merge": True}})
# ToMe on ViT before cleanup: after fold_constants, merge_tokens refuses ViT (it finds a folded [1, 1, 197, 197]
# constant added to the scores that it cannot shrink with the tokens).
TOME_VIT = HeldOut("tome_r8", "token merging", ("merge_tokens",), {"merge_tokens": {"r": 8}})


def local(window_tokens: int) -> HeldOut:
    return HeldOut(f"cleanup+local_w{window_tokens}", "local attention", CLEANUP + ("local_attention",),
                   {"local_attention": {"window": window_tokens}})


def tome(merged_per_layer: int) -> HeldOut:
    return HeldOut(f"cleanup+tome_r{merged_per_layer}", "token merging", CLEANUP + ("merge_tokens",),
                   {"merge_tokens": {"r": merged_per_layer}})


RAGGED_MIN_TOKENS = 16  # a right-padded batch's rows hold from this many tokens up to the padded length


@dataclasses.dataclass(frozen=True)
class Config:
    model: str
    batch: int
    seq: int  # tokens; 0: the model's own input size (vit-base: a 224 px image, 197 tokens)
    variants: tuple[HeldOut, ...]
    ragged: bool = False  # a right-padded batch, row lengths drawn uniformly (seeded) from RAGGED_MIN_TOKENS..seq

    @property
    def label(self) -> str:
        return (f"{self.model}" + (" ragged" if self.ragged else "") + f" b{self.batch}"
                + (f" s{self.seq}" if self.seq else ""))

    def lengths(self, seed: int) -> list[int]:
        draw = random.Random(seed)
        return [draw.randint(RAGGED_MIN_TOKENS, self.seq) for _ in range(self.batch)]


# Issue 26's held-out list. bert-base and minilm have 512 learned positions, gpt2-small 1024, llama-tiny 2048.
# Sizes keep a full run (calibration, two passes at repeat 10) near 25 minutes on 2 cores: the 512- to
# 2048-token configs run at batch 1 and with few variants, the padded batches at up to 256 tokens (runtime
# padding removal's block-diagonal attention over all of a batch's tokens costs more than the padded model's).
FULL = (
    Config("bert-base", 1, 128, (BASELINE, CLEANED, MERGE_QKV)),
    Config("bert-base", 8, 128, (BASELINE, CLEANED)),
    Config("bert-base", 1, 512, (BASELINE, local(128))),
    Config("bert-base", 4, 128, (BASELINE, REMOVE_PADDING, REMOVE_PADDING_RUNTIME), ragged=True),
    Config("gpt2-small", 1, 128, (BASELINE, CLEANED, RMSNORM, CRMSNORM)),
    Config("gpt2-small", 1, 1024, (BASELINE, local(128))),
    Config("vit-base", 1, 0, (BASELINE, CLEANED, MERGE_QKV, RMSNORM, CRMSNORM)),
    Config("vit-base", 4, 0, (BASELINE, TOME_VIT)),
    Config("minilm", 1, 128, (BASELINE, CLEANED, MERGE_QKV, tome(8), PRUNE_MERGE)),
    Config("minilm", 8, 128, (BASELINE, CLEANED, tome(12), PRUNE_MERGE)),
    Config("minilm", 1, 512, (BASELINE, CLEANED, local(128), tome(16))),
    Config("minilm", 8, 256, (BASELINE, REMOVE_PADDING, REMOVE_PADDING_RUNTIME), ragged=True),
    Config("llama-tiny", 1, 128, (BASELINE, CLEANED, MERGE_QKV, FUSE_NORM)),
    Config("llama-tiny", 1, 512, (BASELINE, CLEANED, MERGE_QKV, FUSE_NORM, local(128))),
    Config("llama-tiny", 8, 256, (BASELINE, CLEANED, FUSE_NORM)),
    Config("llama-tiny", 1, 2048, (BASELINE, CLEANED, FUSE_NORM, local(256))),
)

# Every family once, at shapes that build and run in seconds: for checking that each variant builds, exports,
# runs and is predicted.
QUICK = (
    Config("minilm", 1, 128, (BASELINE, CLEANED, MERGE_QKV, tome(8), PRUNE_MERGE, local(32))),
    Config("minilm", 4, 128, (BASELINE, REMOVE_PADDING, REMOVE_PADDING_RUNTIME), ragged=True),
    Config("gpt2-small", 1, 64, (BASELINE, CLEANED, RMSNORM, CRMSNORM, local(16))),
    Config("vit-base", 1, 0, (BASELINE, MERGE_QKV, TOME_VIT)),
    Config("llama-tiny", 1, 128, (BASELINE, CLEANED, MERGE_QKV, FUSE_NORM, local(32))),
    Config("llama-tiny", 1, 512, (BASELINE, CLEANED)),
)

# The 31 variants of issue 8's and issue 26's first figures (BENCHMARKS.md), to compare with them.
ISSUE8 = tuple(Config(model, batch, seq, (BASELINE, CLEANED, MERGE_QKV)) for model, batch, seq in (
    ("bert-base", 1, 64), ("bert-base", 1, 128), ("bert-base", 1, 256), ("bert-base", 4, 128),
    ("gpt2-small", 1, 64), ("gpt2-small", 1, 128),
    ("vit-base", 1, 0),
    ("minilm", 1, 128), ("minilm", 8, 128),
    ("llama-tiny", 1, 128), ("llama-tiny", 1, 512)))

SETS = {"full": FULL, "quick": QUICK, "issue8": ISSUE8}

# The issue's own case: llama-tiny's mask construction, folded by cleanup.
SPEEDUP_CHECK = ("llama-tiny b1 s512", "cleanup")


def refusal(held: HeldOut, variant: Variant) -> str | None:
    """Why ``variant`` is no different graph of its own (None when it is): a pass of its own refused, or
    (cleanup alone) nothing applied."""
    if not held.passes:
        return None
    if not held.own_passes:
        return None if variant.applied_passes else "no cleanup pass applied: " + "; ".join(
            f"{o.name}: {o.reason}" for o in variant.outcomes)
    refused = [o for o in variant.outcomes if o.name in held.own_passes and not o.applied]
    return "; ".join(f"{o.name} refused: {o.reason}" for o in refused) or None


def config_variants(config: Config, seed: int) -> tuple[list[ModelGraph], dict[str, str], list[str]]:
    """The config's variants that are graphs of their own, each named "<config label> <variant>"; each
    one's family by name; and why the others were left out."""
    original = load_model(config.model, LoadOptions(batch=config.batch, seq=config.seq or 128, seed=seed))
    if config.ragged:
        original = with_lengths(original, config.lengths(seed))
    cleaned = build_variant(original, VariantSpec(CLEANED.name, CLEANUP))  # shared by every cleanup+X
    graphs, families, skipped = [], {}, []
    for held in config.variants:
        if held.passes[:len(CLEANUP)] == CLEANUP:
            variant = cleaned
            for end in range(len(CLEANUP) + 1, len(held.passes) + 1):
                variant = extend_variant(variant, VariantSpec(held.name, held.passes[:end], held.knobs))
        else:
            variant = build_variant(original, VariantSpec(held.name, held.passes, held.knobs))
        why = refusal(held, variant)
        name = f"{config.label} {held.name}"
        if why:
            skipped.append(f"{name}: {why}")
            continue
        variant.graph.name = name
        graphs.append(variant.graph)
        families[name] = held.family
    return graphs, families, skipped


def family_breakdown(rows: list[ComparisonRow], families: dict[str, str]) -> dict[str, dict]:
    """Per pass family: absolute error (MAPE, share within ±10 %) and speed-up error over each variant's own
    baseline, per predictor, with the variant furthest off."""
    baselines = {row.name.rsplit(" ", 1)[0]: row for row in rows if families[row.name] == "baseline"}
    breakdown = {}
    for family in dict.fromkeys(families[row.name] for row in rows):
        members = [row for row in rows if families[row.name] == family]
        entry: dict[str, Any] = {"variants": len(members), "names": [row.name for row in members],
                                 "scores": {p: {k: v for k, v in s.items() if k != "kendall_tau"}
                                            for p, s in score(members).items()}}
        if family != "baseline":
            paired = [baselines[row.name.rsplit(" ", 1)[0]] for row in members
                      if row.name.rsplit(" ", 1)[0] in baselines]
            entry["speedups"] = speedup_scores(members + paired)
        breakdown[family] = entry
    return breakdown


def speedup_check(rows: list[ComparisonRow]) -> dict | None:
    """llama-tiny at 512 tokens: ``cleanup``'s predicted against measured speed-up, per predictor."""
    config, variant = SPEEDUP_CHECK
    by_name = {row.name: row for row in rows}
    base, row = by_name.get(f"{config} baseline"), by_name.get(f"{config} {variant}")
    if base is None or row is None:
        return None
    measured = measured_speedup(row, base)
    check = {"variant": row.name, "measured_speedup": measured,
             "baseline_ms": base.measured_ms, "variant_ms": row.measured_ms}
    for predictor in PREDICTORS:
        if predictor in row.predicted_ms and predictor in base.predicted_ms:
            predicted = base.predicted_ms[predictor] / row.predicted_ms[predictor]
            check[predictor] = {"predicted_speedup": predicted, "relative_error": predicted / measured - 1}
    return check


def print_breakdown(console: Console, breakdown: dict[str, dict]) -> None:
    def off(entry):  # families furthest off first: by the calibrated (else roofline) median speed-up error
        s = entry.get("speedups", {})
        return -(s.get("calibrated") or s.get("roofline") or {}).get("median_error_pp", -1.0)

    console.print("per family (furthest off first): MAPE calibrated / roofline / FLOPs-only; median speed-up "
                  "error in points; the variant furthest off for the calibrated model")
    for family, entry in sorted(breakdown.items(), key=lambda item: off(item[1])):
        mape = " / ".join(f"{entry['scores'][p]['mape']:5.1%}" for p in PREDICTORS if p in entry["scores"])
        line = f"  {family:16s} n={entry['variants']:2d}  MAPE {mape}"
        speedups = entry.get("speedups", {})
        if speedups:
            line += "  speed-up error " + " / ".join(f"{speedups[p]['median_error_pp']:4.1f}" for p in PREDICTORS
                                                      if p in speedups)
            worst = (speedups.get("calibrated") or speedups.get("roofline"))["worst"]
            line += (f"  furthest {worst['variant']}: predicted {worst['predicted_speedup']:.2f}x, "
                     f"measured {worst['measured_speedup']:.2f}x")
        console.print(line)


def print_speedup_check(console: Console, check: dict | None) -> None:
    if check is None:
        console.print(f"{' '.join(SPEEDUP_CHECK)}: not in this run")
        return
    cells = "; ".join(f"{p} {check[p]['predicted_speedup']:.2f}x ({check[p]['relative_error']:+.1%})"
                      for p in PREDICTORS if p in check)
    console.print(f"{check['variant']} over its baseline: measured {check['measured_speedup']:.2f}x "
                  f"({check['baseline_ms']:.1f} -> {check['variant_ms']:.1f} ms); predicted {cells}")


def dry_run(configs: tuple[Config, ...], args, console: Console) -> None:
    """Build every variant and predict it with the roofline (or ``--profile``): what a run would measure."""
    cost_model = cost_model_for("cpu", args.backend, profile_path=args.profile, calibrated=args.profile is not None)
    predictor = "calibrated" if args.profile is not None else "roofline"
    counts: dict[str, int] = {}
    total_ms = 0.0
    for config in configs:
        started = time.time()
        graphs, families, skipped = config_variants(config, args.seed)
        for graph in graphs:
            predicted = predict_all(graph, cost_model)[predictor]
            total_ms += predicted
            counts[families[graph.name]] = counts.get(families[graph.name], 0) + 1
            console.print(f"{graph.name:44s} {families[graph.name]:16s} {predictor} {predicted:9.1f} ms")
        for line in skipped:
            console.print(f"  left out: {line}")
        console.print(f"  ({time.time() - started:.0f} s to build)")
        del graphs
        gc.collect()
    block = interleave_block(args.backend)
    # Per variant and pass: 2 warm-up runs, an untimed run before every block of timed ones, and the
    # lowering's own run and torch's reference run for the output check (tfcompile.measure.measure_here).
    runs = 2 + math.ceil(args.repeat / block) * (block + (block > 1)) + 2
    console.print(f"{sum(counts.values())} variants: " + ", ".join(f"{f} {n}" for f, n in counts.items()))
    console.print(f"sum of {predictor} predictions {total_ms / 1e3:.1f} s a pass; about {runs} runs of each "
                  f"variant a pass: {args.passes * runs * total_ms / 1e3 / 60:.1f} min of model runs over "
                  f"{args.passes} passes, besides calibration, exports and session creation")


def refit(profile: Profile, backend: str) -> Profile:
    """``profile``'s micro-benchmark times, fitted again with this checkout's kernel grouping and features (the
    suite's graphs rebuilt, nothing measured): to judge a change of the cost model on the same measurements."""
    measured = {record["name"]: record["measured_s"] for record in profile.samples}
    samples = []
    for bench in default_suite():
        if bench.name in measured:
            module, inputs = bench.build()
            samples.append(Sample(bench.name, export_module(module, inputs, name=bench.name), measured[bench.name]))
    fitted = fit_checked(samples, profile.target, backend, host=profile.host, host_id=profile.host_id)
    fitted.probe_gemm_flops_per_s = profile.probe_gemm_flops_per_s
    fitted.probe_read_bytes_per_s = profile.probe_read_bytes_per_s
    return fitted


def replay(configs: tuple[Config, ...], args, cost_model,
           summary: dict) -> tuple[list[list[ComparisonRow]], dict[str, str], list[str]]:
    """A previous run's variants, with the medians (and, when it recorded them, the timed runs) it measured in
    each pass, predicted by ``cost_model``: the variants are built again (same seed), nothing is measured."""
    passes = summary["passes"]
    runs = summary.get("pass_samples_ms") or [{} for _ in passes]
    measured_by_pass: list[list[ComparisonRow]] = [[] for _ in passes]
    families: dict[str, str] = {}
    for config in configs:
        graphs, config_families, _ = config_variants(config, args.seed)
        for graph in graphs:
            if all(graph.name in medians for medians in passes):
                families[graph.name] = config_families[graph.name]
                predicted = predict_all(graph, cost_model)
                for rows, medians, samples in zip(measured_by_pass, passes, runs):
                    runs_of_pass = tuple(samples.get(graph.name, ()))
                    rows.append(ComparisonRow(graph.name, medians[graph.name], predicted,
                                              (runs_of_pass,) if runs_of_pass else ()))
        del graphs
        gc.collect()
    return measured_by_pass, families, list(summary.get("skipped", []))


def explain_furthest(rows: list[ComparisonRow], configs: tuple[Config, ...], args, cost_model,
                     console: Console) -> list:
    """``compare --explain-ops`` over the run: the variants furthest off, built again and profiled on ORT."""
    count = explained_count(args.backend, args.explain_ops)
    if not count:
        return []
    _, worst = furthest_rows(rows, count)
    graphs: dict[str, ModelGraph] = {}
    for config in configs:
        if any(row.name.startswith(config.label + " ") for row in worst):
            built, _, _ = config_variants(config, args.seed)
            graphs.update({g.name: g for g in built if any(row.name == g.name for row in worst)})
    with console.status(f"profiling the {count} variants furthest off on ORT"):
        explained = explain(worst, graphs, cost_model, count=count)
    show_explanations(explained, console)
    return explained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["ort", "tvm", "torch"], default="ort")
    parser.add_argument("--set", choices=sorted(SETS), default="full", help="which held-out variants")
    parser.add_argument("--models", help="comma-separated zoo names: only their configs")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--passes", type=int, default=2,
                        help="measure every config this many times, minutes apart; keep each variant's lowest median")
    parser.add_argument("--seed", type=int, default=0, help="weights of the seeded models, lengths of padded batches")
    parser.add_argument("--dry-run", action="store_true",
                        help="build every variant and print its predicted latency; calibrate and measure nothing")
    parser.add_argument("--profile", type=Path, help="predict with this profile (made on this host) instead of "
                        "calibrating; with --dry-run, instead of the roofline")
    parser.add_argument("--replay", type=Path, help="measure nothing: take the medians of a previous run's "
                        "summary.json (on this host) and predict its variants with this checkout's cost model")
    parser.add_argument("--refit", action="store_true", help="with --replay and --profile: refit the profile's "
                        "coefficients to its recorded micro-benchmark times with this checkout's kernel grouping")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--explain-ops", type=int, default=None, metavar="N",
                        help="profile the N variants furthest off on ORT and split their time per group of ops "
                             "(default: 3 with --backend ort, else 0; with --replay the profiles are taken now)")
    args = parser.parse_args()
    if args.refit and not (args.replay and args.profile):
        parser.error("--refit needs --replay and --profile")
    if args.replay and not args.profile:
        parser.error("--replay needs --profile (the one the replayed run calibrated)")
    console = Console(soft_wrap=True)  # rows of a table are wider than a pipe's 80 columns
    configs = SETS[args.set]
    if args.models:
        wanted = {m.strip() for m in args.models.split(",") if m.strip()}
        unknown = wanted - {c.model for c in configs}
        if unknown:
            parser.error(f"--models: {', '.join(sorted(unknown))} not in --set {args.set}")
        configs = tuple(c for c in configs if c.model in wanted)
    if args.dry_run:
        dry_run(configs, args, console)
        return
    started = time.time()

    args.out.mkdir(parents=True, exist_ok=True)
    calibration_s = 0.0
    if args.profile is None:
        with console.status("calibrating") as status:
            fitted = calibrate_here(args.backend, repeat=args.repeat,
                                    progress=lambda m: status.update(f"calibrating {m}"))
        calibration_s = time.time() - started
        profile_file = save_profile(fitted, args.out / f"profile-cpu-{args.backend}.json")
    elif args.refit:
        profile_file = save_profile(refit(load_profile("cpu", args.backend, args.profile), args.backend),
                                    args.out / f"profile-cpu-{args.backend}.json")
    else:
        profile_file = args.profile
    # The profile read back from its file: what a later run with this profile predicts.
    cost_model = cost_model_for("cpu", args.backend, profile_path=profile_file)
    profile = cost_model.profile
    console.print(f"calibration{'' if args.profile is None else ' from ' + str(args.profile)}: "
                  f"{len(profile.samples)} micro-benchmarks" + (f" in {calibration_s:.0f} s" if calibration_s else "")
                  + f", fit MAPE {profile.fit_mape:.1%}; held out: {profile.heldout_mape:.1%} "
                  f"(roofline {profile.heldout_roofline_mape:.1%})")

    measured_by_pass: list[list[ComparisonRow]] = []
    families: dict[str, str] = {}
    skipped: list[str] = []
    config_wall_s: dict[str, list[float]] = {}
    host_speed: dict[str, list[dict]] = {}  # per config and pass: the probes around its measurement
    # Per config and pass: the reference layers' calibration time over their time around it.
    speed_factors: dict[str, list[float]] = {}
    steadied_by_pass: list[list[ComparisonRow]] = []  # the measured times brought to calibration speed
    if args.replay:
        measured_by_pass, families, skipped = replay(configs, args, cost_model, json.loads(args.replay.read_text()))
    with console.status("measuring") as status, reference_layers(
            [] if args.replay else profile.samples, args.backend) as references:
        for pass_index in range(0 if args.replay else args.passes):
            rows_of_pass, steadied_rows = [], []
            # One config's variants at a time, freed before the next config's are built.
            for config in configs:
                config_started = time.time()
                status.update(f"pass {pass_index + 1}/{args.passes}: {config.label}: building variants")
                graphs, config_families, config_skipped = config_variants(config, args.seed)
                if pass_index == 0:
                    families.update(config_families)
                    skipped += config_skipped
                    for line in config_skipped:
                        console.print(f"left out {line}")
                while graphs:
                    try:
                        reference_before_s = references.time_s()
                        with probes_around(True) as probes:
                            variant_rows = measure_and_predict(
                                graphs, cost_model=cost_model, repeat=args.repeat,
                                progress=lambda m: status.update(f"pass {pass_index + 1}: {m}"),
                                group_key=lambda graph, label=config.label: label)
                        rows_of_pass += variant_rows
                        factor = references.speed_factor(reference_before_s, references.time_s())
                        if factor is not None:
                            speed_factors.setdefault(config.label, []).append(factor)
                            steadied_rows += at_calibration_speed(variant_rows, factor)
                            console.print(f"{config.label}, pass {pass_index + 1}: reference layers ran at "
                                          f"{factor:.2f}x calibration speed", markup=False)
                        record = speed_record(profile.host_speed, *probes)
                        host_speed.setdefault(config.label, []).append(record)
                        if speed_text(record):
                            console.print(f"{config.label}, pass {pass_index + 1}: {speed_text(record)}",
                                          markup=False)
                        break
                    except BackendError as exc:
                        # A variant the runtime computes differently is left out, with the check's words;
                        # the rest of the config is measured again without it.
                        failed = [g for g in graphs if f"{g.name}:" in str(exc)]
                        if not failed:
                            raise
                        graphs = [g for g in graphs if g not in failed]
                        skipped.append(f"{failed[0].name}: {first_line(exc)}")
                        console.print(f"left out {skipped[-1]}", markup=False)
                del graphs
                gc.collect()
                config_wall_s.setdefault(config.label, []).append(time.time() - config_started)
            measured_by_pass.append(rows_of_pass)
            steadied_by_pass.append(steadied_rows)
    rows = lowest_of_passes(measured_by_pass)
    scores = score(rows)
    for row in rows:
        cells = "  ".join(f"{k} {v:9.2f} ({(v - row.measured_ms) / row.measured_ms:+5.0%})"
                          for k, v in row.predicted_ms.items())
        console.print(f"{row.name:46s} measured {row.measured_ms:9.2f} ms  {cells}")
    for predictor, s in scores.items():
        console.print(f"{predictor:10s} MAPE {s['mape']:6.1%}  within ±10% {s['within_10pct']:5.0%}  "
                      f"Kendall tau {s['kendall_tau']:.3f}  (n={len(rows)})")
    speedups = speedup_scores(rows)
    for predictor, s in speedups.items():
        worst = s["worst"]
        console.print(f"{predictor:10s} speed-up error median {s['median_error_pp']:.1f} points over "
                      f"{s['variants']} variants; furthest off {worst['variant']}: predicted "
                      f"{worst['predicted_speedup']:.2f}x, measured {worst['measured_speedup']:.2f}x")
    steadied_scores = score(lowest_of_passes(steadied_by_pass)) if speed_factors else {}
    for predictor, s in steadied_scores.items():
        console.print(f"{predictor:10s} at calibration speed: MAPE {s['mape']:6.1%}  within ±10% "
                      f"{s['within_10pct']:5.0%}  Kendall tau {s['kendall_tau']:.3f}")
    breakdown = family_breakdown(rows, families)
    print_breakdown(console, breakdown)
    check = speedup_check(rows)
    print_speedup_check(console, check)
    explained = explain_furthest(rows, configs, args, cost_model, console)
    title = f"cpu/{args.backend}: {len(rows)} held-out variants ({args.set} set)"
    write_outputs(rows, scores, args.out / f"cost-model-{args.backend}", title=title)
    (args.out / f"cost-model-{args.backend}" / "summary.json").write_text(json.dumps(
        {"host": profile.host, "host_id": profile.host_id, "set": args.set, "repeat": args.repeat,
         "profile": str(profile_file), "calibration_micro_benchmarks": len(profile.samples),
         "calibration_s": calibration_s,
         "calibration_fit_mape": profile.fit_mape,
         "heldout_mape": profile.heldout_mape, "heldout_roofline_mape": profile.heldout_roofline_mape,
         "scores": scores, "speedups": speedups, "families": breakdown, "llama_tiny_s512_cleanup": check,
         "skipped": skipped, "config_wall_s": config_wall_s, "host_speed": host_speed,
         "reference_speed": speed_factors, "scores_at_calibration_speed": steadied_scores,
         "replayed_from": str(args.replay) if args.replay else None,
         "host_speed_at_calibration": profile.host_speed.as_dict() if profile.host_speed else None,
         "passes": [{row.name: row.measured_ms for row in p} for p in measured_by_pass],
         "explained": [dataclasses.asdict(e) for e in explained],
         "pass_samples_ms": [{row.name: [ms for runs in row.samples_ms for ms in runs] for row in p}
                             for p in measured_by_pass],
         "wall_s": time.time() - started}, indent=2) + "\n")
    console.print(f"wrote {args.out / f'cost-model-{args.backend}'} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
