"""Token pruning (Zero-TPrune) and merging (ToMe) on minilm: quality, FLOPs and measured speed per schedule.

One run, two kinds of real English input from ``tfcompile.corpus``, each at
batch B × seq N (static shapes) over ``--rows`` rows (≥ 200):
- sentences: one prose sentence per row, right-padded to N (sentence
  encoders' usual batch; most slots are padding, which the pass drops first);
- passages: N consecutive tokens of running text per row, no padding, so every
  dropped token is a real one;
- heldout: passages half-way between consecutive test passages (of 256), to choose a
  schedule on text the reported figures are not measured on.
For each schedule: FLOPs cut (cost model), mean cosine of the sentence
embeddings against the unpruned model over all rows, and the ONNX Runtime CPU
latency ratio against the unpruned model (same process, interleaved, median
of ``--repeat``; ORT output checked against torch). ``--tvm`` adds TVM for
the unpruned model and the schedules named in ``--tvm-schedules``. Writes
``benchmarks/results/token_pruning.png`` and prints a markdown table.
``--quality-only`` skips lowering and timing (FLOPs and mean cosine only, no plot).

    .venv/bin/python benchmarks/token_pruning.py [--rows 256] [--repeat 5] [--tvm] [--quality-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from tfcompile.backends.runner import lower
from tfcompile.backends.timing import ORT_BLOCK, measure_interleaved
from tfcompile.corpus import (
    encode_document,
    encode_sentences,
    english_sentences,
    running_text,
)
from tfcompile.cost_models.model import cost_model_for
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.knob_search.token_schedule import batched, mean_cosine, outputs_on
from tfcompile.passes import apply_pass

SCHEDULES = {
    "L2 0.8": {"keep_ratio": 0.8, "layers": [2]},
    "L0-2 0.9": {"keep_ratio": 0.9, "layers": [0, 1, 2]},
    "L0 0.8 sim": {"keep_ratio": 0.8, "layers": [0], "sim_fraction": 1.0},
    "L0 0.6 sim": {"keep_ratio": 0.6, "layers": [0], "sim_fraction": 1.0},
    "L2 0.8 imp": {"keep_ratio": 0.8, "layers": [2], "sim_fraction": 0.0},
    "L0 0.5+L2 0.7": {"keep_ratio": [0.5, 0.7], "layers": [0, 2], "sim_fraction": 1.0},
    "L0 0.4 sim": {"keep_ratio": 0.4, "layers": [0], "sim_fraction": 1.0},
    # merge=True (ToMe sizes: size-weighted pooling, proportional attention, averaged states):
    # the best quality per FLOPs cut found on 256 passages (see the pass's docstring).
    "L0 0.6 sim merge": {"keep_ratio": 0.6, "layers": [0], "sim_fraction": 1.0, "merge": True},
    "L0 0.65 sim merge": {"keep_ratio": 0.65, "layers": [0], "sim_fraction": 1.0, "merge": True},
    "L0 0.7+L2 0.9 merge": {"keep_ratio": [0.7, 0.9], "layers": [0, 2], "sim_fraction": 1.0, "merge": True},
    "L0-4 0.85 merge": {"keep_ratio": 0.85, "layers": [0, 1, 2, 3, 4], "sim_fraction": 1.0, "merge": True},
    "L0-4 0.9 merge": {"keep_ratio": 0.9, "layers": [0, 1, 2, 3, 4], "sim_fraction": 1.0, "merge": True},
    # merge_tokens (ToMe bipartite matching, tokens merged per layer between attention and FFN).
    # "ToMe r13" had the largest FLOPs cut with held-out cosine >= 0.98 among six schedules tried
    # on 128 passages that lie between the 256 test ones (BENCHMARKS.md).
    "ToMe r12": {"pass": "merge_tokens", "r": 12},
    "ToMe r13": {"pass": "merge_tokens", "r": 13},
    "ToMe 10-16": {"pass": "merge_tokens", "r": [10, 12, 13, 14, 15, 16]},
    "ToMe 10-22": {"pass": "merge_tokens", "r": [10, 12, 13, 15, 17, 22]},
}


def inputs_for(kind: str, rows: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "sentences":
        return encode_sentences(english_sentences(rows), seq)
    # Windows spread evenly over the whole text: distinct passages, hundreds of tokens apart.
    # "heldout": windows half-way between those of 256 test passages, for choosing a schedule.
    step = (len(running_text()) - 8 * seq) // (rows if kind == "passages" else 256)
    start = step // 2 if kind == "heldout" else 0
    docs = [encode_document(seq, start + step * i) for i in range(rows)]
    return torch.cat([d[0] for d in docs]), torch.cat([d[1] for d in docs])


def token_fraction(record, layers: int) -> float:
    """Mean share of the N tokens that the layers process (what the FLOPs cut follows); ``record``:
    the token pass's ``TokenCounts``."""
    if record is None:
        return 1.0
    n, counts, per_layer, current = record.tokens[0], iter(record.tokens[1:]), [], record.tokens[0]
    for layer in range(layers):
        per_layer.append(current / n)
        if layer in record.layers:
            current = next(counts)
    return sum(per_layer) / layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--kinds", default="sentences,passages")
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--tvm", action="store_true")
    parser.add_argument("--tvm-schedules", default="L0 0.6 sim")
    parser.add_argument("--tvm-kinds", default="sentences")
    parser.add_argument("--png", default="benchmarks/results/token_pruning.png")
    parser.add_argument("--quality-only", action="store_true", help="FLOPs and mean cosine only: no lowering, "
                        "no timing")
    args = parser.parse_args()
    names = [s for s in args.schedules.split(",") if s]
    cpu = cost_model_for("cpu", calibrated=False)
    rows_out = []
    curves = {}
    for kind in args.kinds.split(","):
        started = time.time()
        inputs = inputs_for(kind, args.rows, args.seq)
        padding = 1 - inputs[1].float().mean().item()
        batches = batched(inputs, args.batch)
        base = load_model("minilm", LoadOptions(batch=args.batch, seq=args.seq))
        base = dataclasses.replace(base, example_inputs=batches[0], name=f"minilm-{kind}")
        reference = outputs_on(base, batches)
        base_flops = cpu.predict(base).flops
        layers = sum(1 for n in base.call_nodes() if "scaled_dot_product_attention" in str(n.target))
        print(f"\n{kind}: {len(batches) * args.batch} rows, batch {args.batch} x seq {args.seq}, "
              f"{padding:.0%} padding")
        graphs = {"unpruned": base}
        stats = {"unpruned": (0.0, 1.0, "", 1.0)}
        for name in names:
            knobs = dict(SCHEDULES[name])
            pruned, outcome = apply_pass(base, knobs.pop("pass", "prune_tokens"), **knobs)
            if not outcome.applied:
                print(f"  {name}: not applied: {outcome.reason}")
                continue
            cut = 1 - cpu.predict(pruned).flops / base_flops
            quality = mean_cosine(reference, outputs_on(pruned, batches))
            graphs[name] = dataclasses.replace(pruned, name=f"minilm-{kind}-{name.replace(' ', '_')}")
            stats[name] = (cut, quality, outcome.reason.split(": ")[1].split(" (")[0],
                           token_fraction(outcome.record, layers))
            print(f"  {name}: {stats[name][2]} tokens, FLOPs cut {cut:.1%}, mean cosine {quality:.4f}", flush=True)
        speed = {name: {} for name in graphs}
        if not args.quality_only:
            with tempfile.TemporaryDirectory() as tmp:
                lowered = {name: lower(g, "ort", Path(tmp) / "ort" / str(i))
                           for i, (name, g) in enumerate(graphs.items())}
                for name, low in lowered.items():
                    err = (torch.as_tensor(low.outputs[0]) - graphs[name].run()[0]).abs().max().item()
                    if err > 1e-4:
                        raise SystemExit(f"ORT output of {name} differs from torch by {err:.1e}")
                times = measure_interleaved({k: v.run for k, v in lowered.items()}, backend="ort",
                                            warmup=1, repeat=args.repeat, block=ORT_BLOCK)
                for name in graphs:
                    speed[name] = {"ort": times["unpruned"].median_s / times[name].median_s,
                                   "ort_ms": times[name].median_ms}
                if args.tvm and kind in args.tvm_kinds.split(","):
                    chosen = ["unpruned"] + [s for s in args.tvm_schedules.split(",") if s in graphs]
                    tvm_started = time.time()
                    tvm_low = {name: lower(graphs[name], "tvm", Path(tmp) / "tvm" / str(i))
                               for i, name in enumerate(chosen)}
                    print(f"  tvm lowering: {time.time() - tvm_started:.0f} s")
                    tvm_times = measure_interleaved({k: v.run for k, v in tvm_low.items()}, backend="tvm",
                                                    warmup=1, repeat=args.repeat)
                    for name in chosen:
                        err = (torch.as_tensor(tvm_low[name].outputs[0]) - graphs[name].run()[0]).abs().max().item()
                        speed[name]["tvm"] = tvm_times["unpruned"].median_s / tvm_times[name].median_s
                        speed[name]["tvm_ms"] = tvm_times[name].median_ms
                        speed[name]["tvm_err"] = err
        curves[kind] = []
        for name in graphs:
            cut, quality, steps, frac = stats[name]
            s = speed[name]
            tvm = f"{s['tvm']:.2f}x ({s['tvm_ms']:.0f} ms)" if "tvm" in s else ""
            ort = f"{s['ort']:.2f}x ({s['ort_ms']:.0f} ms)" if "ort" in s else ""
            rows_out.append(f"| {kind} ({padding:.0%} pad) | {name} | {steps or args.seq} | {frac:.2f} | {cut:.1%} | "
                            f"{quality:.4f} | {ort} | {tvm} |")
            print(rows_out[-1], flush=True)
            curves[kind].append((frac, quality, s.get("ort")))
        print(f"  ({time.time() - started:.0f} s)")
    print("\n| input | schedule | tokens per cut | mean token share | FLOPs cut | mean cosine | ORT speedup (ms) "
          "| TVM speedup (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows_out))
    if not args.quality_only:
        _plot(curves, Path(args.png))


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, points in curves.items():
        # Schedules, not a sweep of one knob: points, not lines (several share a token share).
        xs = [p[0] for p in points]
        left.plot(xs, [p[1] for p in points], "o", label=kind)
        right.plot(xs, [p[2] for p in points], "o", label=kind)
    left.axhline(0.98, color="grey", ls="--", lw=1)
    left.set(xlabel="mean share of tokens per layer (effective keep ratio)", ylabel="mean cosine vs unpruned",
             title="minilm quality")
    right.axhline(1.4, color="grey", ls="--", lw=1)
    right.set(xlabel="mean share of tokens per layer (effective keep ratio)", ylabel="ORT CPU speedup",
              title="measured speedup (2 threads)")
    for ax in (left, right):
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
