"""Padding removal on ONNX Runtime CPU: BERT-base, batch 8, lengths uniform in [16, 512].

One run: the padded model and its ``remove_padding`` variant are lowered to ORT,
checked against the torch reference at valid positions, and timed interleaved.
Prints the measured speedup next to the ideal work ratios (token-wise B·L/Σl,
attention B·L²/Σl², and the whole graph's FLOP ratio) and the roofline's
predicted latency ratio.

    .venv/bin/python benchmarks/padding.py [--seed 0] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from tfcompile.backends.runner import interleave_block, lower
from tfcompile.backends.timing import measure_interleaved
from tfcompile.cost_models.model import cost_model_for
from tfcompile.cost_models.padding_gain import ideal_speedup
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.passes import PassContext, Workload, apply_pass
from tfcompile.passes.padding import with_lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", choices=["ort", "tvm", "torch"], default="ort")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_len, args.seq) for _ in range(args.batch)]
    print(f"{args.model} batch {args.batch} seq {args.seq}, lengths {lengths} (seed {args.seed})")
    started = time.time()
    padded = with_lengths(load_model(args.model, LoadOptions(batch=args.batch, seq=args.seq)), lengths)
    # The cpu roofline with ORT: the pass's default context, and the predictor below.
    cpu = cost_model_for("cpu", calibrated=False)
    context = PassContext(cpu, Workload(lengths=tuple(lengths)))
    packed, outcome = apply_pass(padded, "remove_padding", context=context)
    if not outcome.applied:
        raise SystemExit(f"remove_padding did not apply: {outcome.reason}")
    print(f"remove_padding: {outcome.reason} ({time.time() - started:.0f} s to load and rewrite)")

    ideal = ideal_speedup(lengths, args.seq)
    before, after = cpu.predict(padded), cpu.predict(packed)
    flop_ratio = before.flops / after.flops
    predicted = before.latency_s / after.latency_s

    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        runs = {name: lower(graph, args.backend, Path(tmp) / name) for name, graph in
                (("padded", padded), ("packed", packed))}
        print(f"{args.backend} lowering: {time.time() - started:.0f} s")
        valid = torch.arange(args.seq).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
        reference = padded.run()[0]
        got = torch.as_tensor(runs["packed"].outputs[0])
        err = ((reference[valid] - got[valid]).abs().max() / reference[valid].abs().max()).item()
        print(f"packed {args.backend} vs padded torch at valid positions: max relative error {err:.1e}")
        times = measure_interleaved({k: v.run for k, v in runs.items()}, backend=args.backend,
                                    warmup=args.warmup, repeat=args.repeat, block=interleave_block(args.backend))
    measured = times["padded"].median_s / times["packed"].median_s
    print(f"padded {times['padded'].median_ms:9.1f} ms   packed {times['packed'].median_ms:9.1f} ms   "
          f"(median of {args.repeat}, interleaved)")
    print(f"measured speedup         {measured:5.2f}x")
    print(f"ideal token-wise B*L/sum(l)      {ideal.token_wise:5.2f}x   (padding {ideal.padding_fraction:.0%})")
    print(f"ideal attention B*L^2/sum(l^2)   {ideal.attention:5.2f}x")
    print(f"ideal whole graph (FLOP ratio)   {flop_ratio:5.2f}x")
    print(f"roofline predicted (cpu.toml)    {predicted:5.2f}x   "
          f"({before.latency_s * 1e3:.0f} ms -> {after.latency_s * 1e3:.0f} ms predicted)")


if __name__ == "__main__":
    main()
