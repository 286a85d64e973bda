"""Generation on ONNX Runtime CPU: TTFT, TPOT, and the decode step against the memory-bandwidth bound.

gpt2-small from the zoo (seeded *random* weights, 124M parameters, fp32) is
traced as a prefill graph and a decode-step graph with a static KV cache
(``tfcompile.generation.trace``: one key and one value tensor per layer,
``max_len = prompt + new tokens - 1``), exported to ONNX and run as a greedy
generation with every input and output bound to pre-allocated buffers
(``tfcompile.generation.measure``). TTFT = prefill + first argmax; TPOT = one
decode step + its argmax, over every step of every timed generation.

The bound: a decode step at batch 1 reads every weight once, so TPOT >= weight
bytes / memory bandwidth. The bandwidth is measured here, in this process: a
numpy copy of a ``--copy-mib`` MiB float32 array, counted as bytes read plus
bytes written per second, on one thread and split over ``--threads`` threads
(ORT's thread count); the bound uses the faster of the two. A second,
read-only figure (numpy's BLAS GEMV over a matrix of the same size) is printed
beside it, since a decode step reads its weights and writes almost nothing.
The bytes are the decode graph's parameters (all of them; the tied GPT-2 head
reads the whole token embedding, the position table is read one row per
token) plus the static cache the step reads. Where the step's time goes (ORT's profiler, by op type)
is printed under the table: the GEMVs that stream the weights against the rest.

Figures are labelled "shared" unless ``--quiet-machine`` says nothing else ran;
every figure carries its spread (median, p10-p90).

    .venv/bin/python benchmarks/generation.py                       # gpt2-small, prompt 128, 32 new, batch 1
    .venv/bin/python benchmarks/generation.py --override n_layer=2 --repeat 2   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from tfcompile.backends.ort import default_threads, export_onnx
from tfcompile.backends.timing import Spread
from tfcompile.cost_models.model import cost_model_for
from tfcompile.frontend import zoo
from tfcompile.generation.cost import predict_generation, weight_streaming_bound_s
from tfcompile.generation.greedy import hf_greedy
from tfcompile.generation.measure import measure_generation, profile_decode_step
from tfcompile.generation.trace import example_prompt, trace_generation
from tfcompile.provenance import host_line


def copy_bandwidth(mib: int, threads: int, repeat: int = 7) -> Spread:
    """GB/s (read + written) of copying a ``mib`` MiB array, split into ``threads`` contiguous slices."""
    src = np.random.default_rng(0).random(mib * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page before timing
    bounds = np.linspace(0, src.size, threads + 1, dtype=np.int64)

    def part(i: int) -> None:
        np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])  # numpy releases the GIL

    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        if threads == 1:
            part(0)
        else:
            workers = [threading.Thread(target=part, args=(i,)) for i in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        rates.append(2 * src.nbytes / (time.perf_counter() - start) / 1e9)
    return Spread.of(rates)


def read_bandwidth(mib: int, threads: int, repeat: int = 7) -> Spread:
    """GB/s read by torch's sum over a ``mib`` MiB float32 tensor on ``threads`` threads (read only, vectorised).

    A decode step reads its weights and writes almost nothing, so its floor is
    bytes / read bandwidth; a copy also writes (and reads for ownership)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.rand(mib * 2**20 // 4)
        data.sum()  # touch every page before timing
        rates = []
        for _ in range(repeat):
            start = time.perf_counter()
            data.sum()
            rates.append(data.numel() * 4 / (time.perf_counter() - start) / 1e9)
        return Spread.of(rates)
    finally:
        torch.set_num_threads(previous)


def gemv_read_bandwidth(mib: int, repeat: int = 5) -> Spread:
    """GB/s read by numpy's BLAS GEMV ``x @ W`` over a ``mib`` MiB float32 ``W`` (read-only, like a decode step)."""
    rows = 3072
    weights = np.random.default_rng(1).random((rows, mib * 2**20 // 4 // rows), dtype=np.float32)
    x = np.ones((1, rows), dtype=np.float32)
    x @ weights
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        x @ weights
        rates.append(weights.nbytes / (time.perf_counter() - start) / 1e9)
    return Spread.of(rates)


def _override(text: str) -> tuple[str, int]:
    key, _, value = text.partition("=")
    return key, int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--override", type=_override, action="append", default=[],
                        help="config override KEY=INT (e.g. n_layer=2 for a smoke run)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5, help="timed generations")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--copy-mib", type=int, default=1024)
    parser.add_argument("--no-check", action="store_true", help="skip comparing tokens with HF generate")
    parser.add_argument("--calibration", type=Path, action="append", default=[],
                        help="also predict with this calibrated cpu/ort profile (e.g. "
                             "benchmarks/results/profile-cpu-ort.json)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--quiet-machine", action="store_true",
                        help="label the figures quiet (nothing else ran); the default label is shared")
    args = parser.parse_args()

    model = zoo.build(args.model, seed=0, config_overrides=dict(args.override)).model
    max_len = args.prompt_len + args.new_tokens - 1
    started = time.time()
    graphs = trace_generation(model, batch=args.batch, prompt_len=args.prompt_len, max_len=max_len,
                              name=args.model)
    ids, mask = example_prompt(model.config.vocab_size, args.batch, args.prompt_len)
    with tempfile.TemporaryDirectory() as tmp:
        prefill = export_onnx(graphs.prefill, Path(tmp) / "prefill.onnx", external_data=True)
        decode = export_onnx(graphs.decode, Path(tmp) / "decode.onnx", external_data=True)
        print(f"trace + ONNX export: {time.time() - started:.0f} s")
        timing = measure_generation(prefill, decode, graphs.cache, ids, mask, new_tokens=args.new_tokens,
                                    repeat=args.repeat, warmup=args.warmup, threads=args.threads)
        profile = profile_decode_step(decode, graphs.cache, args.prompt_len, threads=args.threads)
    bandwidth = {1: copy_bandwidth(args.copy_mib, 1), args.threads: copy_bandwidth(args.copy_mib, args.threads)}
    best_gbs = max(s.median for s in bandwidth.values())
    gemv_gbs = gemv_read_bandwidth(args.copy_mib)
    read_gbs = read_bandwidth(args.copy_mib, args.threads)
    weight_bytes, cache_bytes = graphs.decode.parameter_bytes(), graphs.cache.bytes
    read_bound_ms = weight_streaming_bound_s(weight_bytes + cache_bytes, read_gbs.median * 1e9) * 1e3
    bound_ms = weight_streaming_bound_s(weight_bytes + cache_bytes, best_gbs * 1e9) * 1e3
    cost_models = [cost_model_for("cpu", "ort"), *[cost_model_for("cpu", "ort", profile_path=path)
                                                   for path in args.calibration]]
    predictions = [(cm, predict_generation(graphs, cm, new_tokens=args.new_tokens)) for cm in cost_models]
    same = None
    if not args.no_check:
        same = bool(torch.equal(torch.from_numpy(timing.tokens), hf_greedy(model, ids, mask,
                                                                           new_tokens=args.new_tokens)))

    machine = "quiet" if args.quiet_machine else "SHARED"

    def spread(s: Spread, unit: str) -> str:
        return f"{s.median:9.2f} {unit}  (p10 {s.p10:.2f}, p90 {s.p90:.2f}, n={s.runs})"

    print(f"\n{args.model} (seeded random weights, fp32), batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, static cache of {max_len}; ONNX Runtime CPU, {timing.threads} threads, "
          f"IO binding. Host: {host_line()}. Figures: {machine} machine.")
    rows = [
        ("TTFT (prefill + argmax), measured", spread(timing.ttft_ms, "ms")),
        ("TPOT (decode step + argmax), measured", spread(timing.tpot_ms, "ms")),
        ("decode tokens/s", f"{timing.tokens_per_s:9.2f}"),
        *[row for cm, predicted in predictions for row in (
            (f"TTFT predicted ({cm.label})",
             f"{predicted.ttft_s * 1e3:9.2f} ms  ({predicted.bound('prefill')}-bound; "
             f"{predicted.ttft_s * 1e3 / timing.ttft_ms.median:.2f}x measured)"),
            (f"TPOT predicted ({cm.label})",
             f"{predicted.tpot_s * 1e3:9.2f} ms  ({predicted.bound('decode')}-bound; "
             f"{predicted.tpot_s * 1e3 / timing.tpot_ms.median:.2f}x measured)"))],
        ("weights read per decode step", f"{weight_bytes / 1e6:9.1f} MB"),
        ("static KV cache read per step", f"{cache_bytes / 1e6:9.1f} MB"),
        *[(f"copy bandwidth, {n} thread{'s' if n > 1 else ''} (read+write)", spread(s, "GB/s"))
          for n, s in bandwidth.items()],
        (f"bound: (weights + cache) / {best_gbs:.1f} GB/s", f"{bound_ms:9.2f} ms"),
        ("TPOT / bound", f"{timing.tpot_ms.median / bound_ms:9.2f}x"),
        (f"read bandwidth, {args.threads} threads (torch sum)", spread(read_gbs, "GB/s")),
        (f"bound: (weights + cache) / {read_gbs.median:.1f} GB/s read", f"{read_bound_ms:9.2f} ms"),
        ("TPOT / read bound", f"{timing.tpot_ms.median / read_bound_ms:9.2f}x"),
        ("numpy BLAS GEMV read rate (read only)", spread(gemv_gbs, "GB/s")),
        (f"bound at the GEMV read rate {gemv_gbs.median:.1f} GB/s",
         f"{weight_streaming_bound_s(weight_bytes + cache_bytes, gemv_gbs.median * 1e9) * 1e3:9.2f} ms"),
    ]
    if same is not None:
        rows.append(("greedy tokens identical to HF generate", "yes" if same else "NO"))
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    for cm, _ in predictions:
        print(f"  {cm.label}: {cm.provenance['text']}")
    profiled = sum(profile.values())
    print(f"\n  decode step by ONNX op type (ORT profiler, kernel time, {profiled:.2f} ms per step in all; {machine}):")
    for op, ms in list(profile.items())[:8]:
        print(f"    {op:<24} {ms:8.2f} ms  {ms / profiled:5.1%}")
    gemm_ms = profile.get("Gemm", 0.0) + profile.get("MatMul", 0.0)
    if gemm_ms:
        print(f"  Gemm + MatMul (the weight GEMVs, and attention's P.V) read the weights at "
              f"{weight_bytes / gemm_ms / 1e6:.1f} GB/s")
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "overrides": dict(args.override), "shared_machine": not args.quiet_machine,
            "host": host_line(), "read_gbs": read_gbs.as_dict(), "read_bound_ms": read_bound_ms,
            "measured": timing.as_dict(),
            "predicted": [{**predicted.as_dict(), "cost_model": cm.provenance} for cm, predicted in predictions],
            "bandwidth_gbs": {str(n): s.as_dict() for n, s in bandwidth.items()}, "bound_ms": bound_ms,
            "gemv_read_gbs": gemv_gbs.as_dict(),
            "weight_bytes": weight_bytes, "cache_bytes": cache_bytes, "tokens_match_hf": same,
            "decode_profile_ms": profile}, indent=2))


if __name__ == "__main__":
    main()
