"""Exact norm fusion on ONNX Runtime CPU: GPT-2 small (b1, s128) and ViT-base (b1, 224px).

Variants, each exported with the torch.onnx dynamo exporter and timed in one
process, interleaved (median of repeated runs after warm-up):

- plain@<default opset>: the traced model as is (LayerNorm → ONNX LayerNormalization).
- plain@23: the same at opset 23 (the exporter then also emits ONNX Attention).
- rms@23: fold_norm_affine → layernorm_to_rmsnorm (aten.rms_norm → ONNX
  RMSNormalization, which needs opset ≥ 23).
- rms@<default>: the same graph at the default opset, where the exporter
  decomposes rms_norm (Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul) and ORT does
  not fuse it back.
- crms@23: + rmsnorm_to_crmsnorm (d−1 stream; the compressed norm has no ONNX op).
- ort-opt: onnxruntime.transformers.optimizer on plain@<default>; if it fails
  the error is printed and the row is skipped.

Every ONNX output is checked against the torch reference before timing.

    python benchmarks/norm_fusion.py [--models gpt2-small vit-base] [--repeat 20] [--threads 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from pathlib import Path

import torch

from tfcompile.backends.ort import OrtModel, export_onnx
from tfcompile.backends.timing import ORT_BLOCK, measure_interleaved
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.passes import apply_pass
from tfcompile.verify import compare_outputs

ORT_MODEL_TYPE = {"gpt2-small": "gpt2", "vit-base": "vit"}


def _variant(graph, passes):
    for name in passes:
        graph, outcome = apply_pass(graph, name)
        if not outcome.applied:
            raise RuntimeError(f"{name} did not apply: {outcome.reason}")
    return graph


def _ort_optimized(src: Path, dst: Path, model_type: str) -> tuple[Path | None, str]:
    from onnxruntime.transformers import optimizer

    tried = []
    for kind in (model_type, "bert"):
        try:
            model = optimizer.optimize_model(str(src), model_type=kind, num_heads=12, hidden_size=768,
                                             opt_level=1, use_gpu=False)
            model.save_model_to_file(str(dst))
            return dst, f"model_type={kind}" + (f" (after {'; '.join(tried)})" if tried else "")
        except Exception as exc:  # record how the tool fails, then try the generic BERT fusions
            last = traceback.extract_tb(exc.__traceback__)[-1]
            tried.append(f"model_type={kind} failed: {type(exc).__name__}: {str(exc)[:80]} "
                         f"at {Path(last.filename).name}:{last.lineno}")
    return None, "; ".join(tried)


def bench(name: str, repeat: int, threads: int, workdir: Path, reuse: bool = False) -> None:
    print(f"\n=== {name} (batch 1{', seq 128' if name == 'gpt2-small' else ''}), ORT CPU, {threads} threads")
    t0 = time.time()
    graph = load_model(name, LoadOptions(batch=1, seq=128))
    reference = graph.run()
    rms = _variant(graph, ["fold_norm_affine", "layernorm_to_rmsnorm"])
    crms = _variant(rms, ["rmsnorm_to_crmsnorm"])
    exports = {
        "plain@default": (graph, None),
        "plain@23": (graph, 23),
        "rms@23": (rms, 23),
        "rms@default": (rms, None),
        "crms@23": (crms, 23),
    }
    paths = {}
    for key, (g, opset) in exports.items():
        path = workdir / f"{name}-{key}.onnx"
        paths[key] = path if reuse and path.exists() else export_onnx(g, path, opset=opset)
    opt_path, how = _ort_optimized(paths["plain@default"], workdir / f"{name}-ortopt.onnx", ORT_MODEL_TYPE[name])
    print(f"onnxruntime.transformers.optimizer: {'ok, ' if opt_path else 'FAILED: '}{how}")
    if opt_path is not None:
        paths["ort-opt"] = opt_path
    print(f"load + passes + exports: {time.time() - t0:.0f} s")

    models = {key: OrtModel(p, threads=threads) for key, p in paths.items()}
    for key, model in models.items():
        err = compare_outputs(reference, model.run(graph.example_inputs)).max_rel_err
        print(f"  {key:14s} max rel err vs torch: {err:.1e}")
    runs = {key: model.runner(graph.example_inputs) for key, model in models.items()}
    result = measure_interleaved(runs, backend="ort", warmup=3, repeat=repeat, block=ORT_BLOCK)
    base = result["plain@default"].median_s
    base23 = result["plain@23"].median_s
    for key, m in result.items():
        print(f"  {key:14s} median {m.median_ms:8.2f} ms   ×{m.median_s / base:5.3f} vs plain@default"
              f"   ×{m.median_s / base23:5.3f} vs plain@23")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "vit-base"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="write the .onnx files here and reuse those already there")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            bench(name, args.repeat, args.threads, args.keep, reuse=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bench(name, args.repeat, args.threads, Path(tmp))


if __name__ == "__main__":
    main()
