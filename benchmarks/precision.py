"""Precision variants against fp32 on this host: time ratio (one process, interleaved, median) and quality.

For each model and shape:

- ``fp32``: the traced model, exported and run in ONNX Runtime (the baseline).
- ``int8``: tfcompile's ``quantize_int8_dynamic`` variant exported as it is
  (DynamicQuantizeLinear + MatMulInteger, fused by ORT into DynamicQuantizeMatMul).
- ``int8 ort-tool``: ``onnxruntime.quantization.quantize_dynamic(per_channel=True)``
  on the fp32 file, the runtime's own tool (it also quantizes the attention matmuls).
- ``fp16 (forced)``: the ``half_precision`` rewrite exported and run on ORT CPU,
  which has no x86 fp16 GEMM; the pass refuses this pairing, and the row shows why.
- ``torch bf16`` / ``torch fp32``: the same two in torch eager (``half_precision``
  with dtype bf16 against the plain graph), timed against each other: what the
  pass's CPU/torch pairing would get from the host's bf16 instructions.

Quality: mean cosine of each variant's output with the fp32 torch model's, on the
traced inputs and on inputs from another seed (for minilm: other real passages),
which the variants were never chosen on. The host, its ISA extensions and the
thread count are printed first.

    python benchmarks/precision.py [--models bert-base minilm] [--shapes 1x128 8x128] [--repeat 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from tfcompile.backends.ort import OrtModel, export_onnx
from tfcompile.backends.quantize import quantize
from tfcompile.backends.timing import ORT_BLOCK, measure_interleaved
from tfcompile.cost_models.device import load_device
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.passes import PassContext, apply_pass
from tfcompile.provenance import host_line, host_record
from tfcompile.verify import compare_outputs


def _forced(graph, name, device_kind, backend, **knobs):
    """Apply a precision pass under a context that admits it (to measure pairings the search refuses)."""
    device = dataclasses.replace(load_device("cpu"), kind=device_kind,
                                 peak_flops={"fp32": 1.0, "fp16": 4.0, "bf16": 4.0, "int8": 4.0})
    variant, outcome = apply_pass(graph, name, PassContext.build(device, backend, calibrated=False), **knobs)
    if not outcome.applied:
        raise RuntimeError(f"{name} did not apply: {outcome.reason}")
    return variant


def _quality(reference_graph, variant_graph, inputs) -> float:
    return compare_outputs(reference_graph.run(inputs), variant_graph.run(inputs),
                           reference_graph.output_names).quality


def bench(name: str, batch: int, seq: int, repeat: int, threads: int, workdir: Path) -> None:
    print(f"\n=== {name} batch {batch} seq {seq}, {threads} threads")
    started = time.time()
    graph = load_model(name, LoadOptions(batch=batch, seq=seq))
    other = load_model(name, LoadOptions(batch=batch, seq=seq, seed=1)).example_inputs
    host_context = PassContext.build("cpu", "ort", calibrated=False)
    int8, outcome = apply_pass(graph, "quantize_int8_dynamic", host_context)
    if not outcome.applied:  # this host has no VNNI: measure it anyway, to show what the refusal avoids
        print(f"  on this host the pass refuses: {outcome.reason}; measured anyway")
        int8 = _forced(graph, "quantize_int8_dynamic", "cpu", "ort")
    fp16 = _forced(graph, "half_precision", "gpu", "ort", dtype="fp16")
    bf16 = _forced(graph, "half_precision", "cpu", "torch", dtype="bf16")
    paths = {"fp32": export_onnx(graph, workdir / f"{name}-fp32.onnx", external_data=True),
             "int8": export_onnx(int8, workdir / f"{name}-int8.onnx", external_data=True),
             "fp16 (forced)": export_onnx(fp16, workdir / f"{name}-fp16.onnx", external_data=True)}
    paths["int8 ort-tool"] = quantize(paths["fp32"], workdir / f"{name}-int8-tool.onnx", "int8")
    print(f"  passes and exports: {time.time() - started:.0f} s")
    models = {key: OrtModel(path, threads=threads) for key, path in paths.items()}
    torch_fp32 = graph.run()
    print(f"  {'variant':16s} {'quality (traced)':>17s} {'quality (seed 1)':>17s}")
    for key, model in models.items():
        traced = compare_outputs(torch_fp32, model.run(graph.example_inputs), graph.output_names).quality
        held_out = compare_outputs(graph.run(other), model.run(other), graph.output_names).quality
        print(f"  {key:16s} {traced:17.5f} {held_out:17.5f}")
    print(f"  {'torch bf16':16s} {_quality(graph, bf16, graph.example_inputs):17.5f} "
          f"{_quality(graph, bf16, other):17.5f}")
    runs = {key: model.runner(graph.example_inputs) for key, model in models.items()}
    result = measure_interleaved(runs, backend="ort", warmup=3, repeat=repeat, block=ORT_BLOCK)
    base = result["fp32"].median_s
    for key, m in result.items():
        print(f"  ort {key:16s} median {m.median_ms:8.2f} ms   {base / m.median_s:5.2f}x faster than fp32")
    torch.set_num_threads(threads)
    with torch.no_grad():
        eager = {"torch fp32": lambda: graph.gm(*graph.example_inputs),
                 "torch bf16": lambda: bf16.gm(*graph.example_inputs)}
        timed = measure_interleaved(eager, backend="torch", warmup=2, repeat=max(repeat // 2, 5))
    base = timed["torch fp32"].median_s
    for key, m in timed.items():
        print(f"  {key:20s} median {m.median_ms:8.2f} ms   {base / m.median_s:5.2f}x faster than torch fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert-base", "minilm"])
    parser.add_argument("--shapes", nargs="+", default=["1x128", "8x128"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    host = host_record()
    print(f"host: {host_line(host)}; ISA {' '.join(host['isa'])}; ORT and torch on {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for shape in args.shapes:
                batch, seq = (int(n) for n in shape.split("x"))
                bench(name, batch, seq, args.repeat, args.threads, Path(tmp))


if __name__ == "__main__":
    main()
